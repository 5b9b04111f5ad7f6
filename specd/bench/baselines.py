"""The in-process baselines a user would reach for instead of specd: Hugging Face transformers'
`generate` with the oracle alone, and its assisted generation with a standalone draft
(`model.generate(..., assistant_model=draft)`), both on the bench process's own threads.

transformers does not report acceptance, so both models get a forward hook that logs each call;
the order of draft ('d') and oracle ('o') calls gives the draft tokens of every round (one draft
call per candidate token, one oracle call per verification round).

A distilled draft may score only part of the vocabulary (LoadedModel.head_token_ids).
Assisted generation needs the draft to score the oracle's whole vocabulary, so the assistant
used here is the same draft behind `FullVocabularyHead`: the same head rows, scattered into a
full-vocabulary row whose other entries are -inf. Its proposals and their probabilities are
exactly the draft's, at the draft's cost plus one scatter per position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from specd.models.pretrained import LoadedModel

# transformers' assisted-generation settings when the assistant's generation_config leaves them unset.
ASSISTANT_DEFAULTS = {"num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4}


class FullVocabularyHead(torch.nn.Module):
    """A reduced output head seen as a full-vocabulary one: ids outside the head score -inf."""

    def __init__(self, head: torch.nn.Module, head_token_ids: list[int], vocab_size: int):
        super().__init__()
        self.head = head
        self.vocab_size = vocab_size
        self.register_buffer("index", torch.tensor(head_token_ids, dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        partial = self.head(hidden)  # [batch, seq, head size]
        full = partial.new_full((*partial.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.index, partial)  # [batch, seq, vocab]


def full_vocabulary_assistant(draft: LoadedModel) -> torch.nn.Module:
    """The draft's model, usable as a transformers assistant for an oracle of the same vocabulary."""
    model = draft.model
    if draft.head_token_ids is not None and not isinstance(model.get_output_embeddings(), FullVocabularyHead):
        model.set_output_embeddings(FullVocabularyHead(model.get_output_embeddings(), draft.head_token_ids, draft.vocab_size))
    return model


def assistant_settings(model: torch.nn.Module) -> dict[str, Any]:
    config = model.generation_config
    return {name: getattr(config, name, None) if getattr(config, name, None) is not None else default
            for name, default in ASSISTANT_DEFAULTS.items()}


@dataclass
class BaselineRun:
    token_ids: list[int]  # output tokens, EOS excluded (as specd returns them)
    seconds: float
    finish: str
    emitted: int  # tokens the oracle committed, EOS included
    oracle_calls: int  # verification rounds (assisted) or decoding steps (plain), prefill included
    depths: list[int] = field(default_factory=list)  # draft tokens per round (assisted only)


class CallLog:
    """Forward hooks that log which model ran, in order."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.events: list[str] = []
        self._handles = [model.register_forward_hook(self._hook(tag)) for tag, model in models.items()]

    def _hook(self, tag: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.events.append(tag)

        return hook

    def reset(self) -> None:
        self.events.clear()

    def depths(self) -> list[int]:
        """Draft calls before each oracle call."""
        depths, run = [], 0
        for tag in self.events:
            if tag == "d":
                run += 1
            else:
                depths.append(run)
                run = 0
        return depths

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def static_batch(oracle: LoadedModel, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """transformers `generate` on all `prompts` at once (left-padded, greedy, exactly max_tokens new tokens each):
    the static batch a user of the plain library would run. Returns (output tokens, seconds)."""
    pad = oracle.eos_token_ids[0] if oracle.eos_token_ids else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=oracle.device)  # [N, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=oracle.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = oracle.model.generate(
            input_ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
            pad_token_id=pad,
        )
    seconds = time.perf_counter() - started
    return (output.shape[1] - width) * len(prompts), seconds


class TransformersBaselines:
    def __init__(self, oracle: LoadedModel, draft: LoadedModel):
        self.oracle = oracle
        self.assistant = full_vocabulary_assistant(draft)
        self.draft_description = (
            f"{draft.model_id}; reduced head of {len(draft.head_token_ids)} ids seen as the full vocabulary (others -inf)"
            if draft.head_token_ids is not None
            else draft.model_id
        )
        self.calls = CallLog({"o": oracle.model, "d": self.assistant})

    def settings(self) -> dict[str, Any]:
        return {"assistant": self.draft_description, **assistant_settings(self.assistant)}

    def generate(
        self, prompt_ids: list[int], *, assisted: bool, max_tokens: int, temperature: float, seed: int
    ) -> BaselineRun:
        eos = self.oracle.eos_token_ids
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        if assisted:
            sampling["assistant_model"] = self.assistant
        input_ids = torch.tensor([prompt_ids], device=self.oracle.device)
        torch.manual_seed(seed)
        self.calls.reset()
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.oracle.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                eos_token_id=eos or None,
                pad_token_id=eos[0] if eos else 0,
                **sampling,
            )
        seconds = time.perf_counter() - started
        new = output[0, len(prompt_ids) :].tolist()
        finish = "length"
        for i, token in enumerate(new):
            if token in eos:
                new, finish = new[:i], "eos"
                break
        depths = self.calls.depths()
        return BaselineRun(
            token_ids=new,
            seconds=seconds,
            finish=finish,
            emitted=output.shape[1] - len(prompt_ids),
            oracle_calls=len(depths),
            depths=depths if assisted else [],
        )

    def close(self) -> None:
        self.calls.remove()
