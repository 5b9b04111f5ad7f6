"""llama.cpp beside specd on one stream: the same GGUF file, threads, prompt and output lengths.

`specd bench --llama-cpp PATH` runs PATH, a `llama-bench` binary (docs/weights.md says how to build
one here), on the oracle's GGUF file:

    llama-bench -m FILE -t THREADS -p P -n N -r REPEATS -o json

with P the mean prompt length of the measured prompts (after the chat template) and N the output
tokens per request. llama-bench times prompt processing (P tokens in one batch) and generation (N
tokens, one at a time) separately; specd's figures are tokens over each request's whole time,
prompt included, so the row compared is the same: N / (P / prompt speed + N / generation speed).
llama-bench decodes from random tokens of the prompt's length rather than the prompts' own tokens;
a decode step's cost depends on the context length, not on which tokens fill it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPEATS = 3
TIMEOUT_SECONDS = 600


@dataclass
class LlamaCppResult:
    binary: str
    build: str  # llama.cpp's commit and build number, as llama-bench reports them
    threads: int
    prompt_tokens: int
    output_tokens: int
    prompt_tokens_per_second: float
    generation_tokens_per_second: float

    @property
    def tokens_per_second(self) -> float:
        """Output tokens over a request's whole time, prompt included (as specd's rows count)."""
        seconds = self.prompt_tokens / self.prompt_tokens_per_second + self.output_tokens / self.generation_tokens_per_second
        return self.output_tokens / seconds


def gguf_file(oracle: str) -> Path | None:
    """The GGUF file behind an oracle source, or None when it is not one."""
    from specd.models.sources import resolve_source

    kind, path = resolve_source(oracle)
    return path if kind == "gguf" else None


def run_llama_bench(binary: Path, model: Path, threads: int, prompt_tokens: int, output_tokens: int) -> LlamaCppResult:
    command = [
        str(binary), "-m", str(model), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(output_tokens),
        "-r", str(REPEATS), "-o", "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {' | '.join(tail)}")
    rows = json.loads(done.stdout)
    prompt = next(r for r in rows if r.get("n_prompt") and not r.get("n_gen"))
    generation = next(r for r in rows if r.get("n_gen") and not r.get("n_prompt"))
    return LlamaCppResult(
        binary=str(binary),
        build=f"{generation.get('build_commit', '?')} ({generation.get('build_number', '?')})",
        threads=threads,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        prompt_tokens_per_second=float(prompt["avg_ts"]),
        generation_tokens_per_second=float(generation["avg_ts"]),
    )
