"""Stage 1 of `specd distill`: the oracle answers the training prompts (sampled, batched, chat template applied),
recording its top-K next-token distribution at every answer position (temperature 1); cached under the work
directory so a rerun resumes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from specd.models.pretrained import LoadedModel


@dataclass(frozen=True)
class AnswerSettings:
    oracle: str
    prompts_sha256: str
    held_out: float
    answers_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    targets: int  # K: how many of the oracle's most likely tokens are kept per position
    seed: int


@dataclass
class OracleAnswer:
    prompt_ids: list[int]
    answer_ids: list[int]  # ends with an eos token unless cut at max_new_tokens
    top_ids: torch.Tensor  # [n, K] int32: the oracle's K most likely next tokens at answer position i
    top_logprobs: torch.Tensor  # [n, K] float16: their log-probabilities at temperature 1


class _TopKRecorder(LogitsProcessor):
    """Records the top-K log-probabilities of the raw scores at each step, leaving them unchanged."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = torch.topk(torch.log_softmax(scores.float(), dim=-1), self.k, dim=-1)  # [batch, K]
        self.steps.append((top.indices.to(torch.int32), top.values.to(torch.float16)))
        return scores


class _NucleusSampler(LogitsProcessor):
    """Draws each row's next token by top-p sampling among its `candidates` most likely tokens, and
    returns scores whose argmax is that token (generate then decodes greedily).

    transformers' own sampling draws from a softmax over the whole vocabulary (on 2 CPU cores,
    torch.multinomial over 49,152 ids per row took about 70 ms of a 380 ms step at batch 64), and
    its top-p sorts the whole vocabulary. The nucleus at these temperatures lies well inside the
    top few hundred, so drawing among those candidates is the same distribution.
    """

    def __init__(self, top_p: float, candidates: int = 256):
        self.top_p = top_p
        self.candidates = candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = torch.topk(scores, min(self.candidates, scores.shape[-1]), dim=-1)  # sorted, [batch, candidates]
        probs = torch.softmax(top.values.float(), dim=-1)
        keep = (torch.cumsum(probs, dim=-1) - probs) < self.top_p  # the most likely token is always kept
        choice = torch.multinomial(torch.where(keep, probs, 0.0), 1)  # [batch, 1]
        tokens = top.indices.gather(-1, choice)
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens, 0.0)


def _pad_id(loaded: LoadedModel) -> int:
    pad = loaded.tokenizer.pad_token_id
    return int(pad) if pad is not None else loaded.eos_token_ids[0]


def generate_batch(
    oracle: LoadedModel, prompts: list[list[int]], settings: AnswerSettings, seed: int
) -> list[OracleAnswer]:
    """Sample one answer per prompt in one left-padded batch, recording the oracle's top-K."""
    pad = _pad_id(oracle)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [batch, width]
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(oracle.device), attention_mask.to(oracle.device)
    recorder = _TopKRecorder(min(settings.targets, oracle.vocab_size))
    # The recorder runs first, on the raw logits; the warpers after it only shape the sampling.
    processors = LogitsProcessorList([recorder, TemperatureLogitsWarper(settings.temperature)])
    nucleus = settings.top_p < 1.0
    if nucleus:
        processors.append(_NucleusSampler(settings.top_p))
    torch.manual_seed(seed)
    with torch.inference_mode():
        sequences = oracle.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # With the nucleus sampler the token is drawn: generate takes its argmax.
            **({"do_sample": False} if nucleus else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}),
            max_new_tokens=settings.max_new_tokens,
            logits_processor=processors,
            eos_token_id=oracle.eos_token_ids or None,
            pad_token_id=pad,
        )
    top_ids = torch.stack([ids for ids, _ in recorder.steps], dim=1).cpu()  # [batch, steps, K]
    top_logprobs = torch.stack([lp for _, lp in recorder.steps], dim=1).cpu()  # [batch, steps, K]
    sequences = sequences.cpu()
    eos = set(oracle.eos_token_ids)
    answers = []
    for row, prompt in enumerate(prompts):
        generated = sequences[row, width:].tolist()
        length = next((i + 1 for i, t in enumerate(generated) if t in eos), len(generated))
        answers.append(
            OracleAnswer(
                prompt_ids=list(prompt),
                answer_ids=generated[:length],
                top_ids=top_ids[row, :length].clone(),
                top_logprobs=top_logprobs[row, :length].clone(),
            )
        )
    return answers


def oracle_answers(
    oracle: LoadedModel, prompts: list[list[int]], cache: Path, settings: AnswerSettings
) -> list[OracleAnswer]:
    """Answers for every (prompt, i < answers_per_prompt), generated once and cached per batch."""
    meta = cache / "settings.json"
    wanted = json.dumps(asdict(settings), sort_keys=True)
    if meta.exists() and meta.read_text() != wanted:
        tqdm.write(f"answer settings changed; regenerating the oracle's answers in {cache}")
        for stale in [*cache.glob("batch-*.pt"), cache / "seconds.json"]:
            stale.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    meta.write_text(wanted)
    jobs = [index for index in range(len(prompts)) for _ in range(settings.answers_per_prompt)]
    jobs.sort(key=lambda index: len(prompts[index]))  # similar lengths together: less padding
    batches = [jobs[s : s + settings.batch_size] for s in range(0, len(jobs), settings.batch_size)]
    answers: list[OracleAnswer] = []
    with tqdm(total=len(batches), desc="oracle answers", unit="batch", dynamic_ncols=True) as bar:
        for number, batch in enumerate(batches):
            path = cache / f"batch-{number:05d}.pt"
            if path.exists():
                records = torch.load(path, weights_only=True)
            else:
                started = time.perf_counter()
                seed = settings.seed * 1_000_003 + number
                generated = generate_batch(oracle, [prompts[i] for i in batch], settings, seed)
                records = [asdict(answer) for answer in generated]
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                torch.save(records, tmp)
                tmp.replace(path)
                _add_seconds(cache, time.perf_counter() - started)
            answers.extend(OracleAnswer(**record) for record in records)
            bar.update(1)
            bar.set_postfix(tokens=sum(len(a.answer_ids) for a in answers))
    return answers


def _add_seconds(cache: Path, seconds: float) -> None:
    """Accumulate the time spent generating, so that a resumed run still reports the whole cost."""
    path = cache / "seconds.json"
    total = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    path.write_text(json.dumps({"seconds": total + seconds}))


def answering_seconds(cache: Path) -> float:
    path = cache / "seconds.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else 0.0
