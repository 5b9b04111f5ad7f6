"""`specd distill`: train a small draft to imitate an oracle, offline, on a CPU or a CUDA GPU.

The draft is the oracle's own embedding and output head over its first L decoder layers; the
L layers and the final norm are retrained so that the draft's next-token distribution q matches
the oracle's p. Cheap per token (L layers instead of all), and its vocabulary is the oracle's
by construction. Stages, each cached under `<out>/work/` so that a rerun resumes where it stopped:

1. answers: the oracle answers the training prompts (sampled, batched, chat template applied),
   recording its top-K next-token distribution at every answer position (temperature 1). On a
   CPU the oracle runs through oneDNN layers (specd.kernels.cpu_linear), as in a worker.
2. head: with --head-vocab N the draft's output head keeps only the N tokens the oracle emits
   most often in its answers (plus eos), which makes each draft token cheaper.
3. training: KL(p || q), teacher-forced on prompt + answer, loss on the answer positions;
   checkpointed every --checkpoint-every steps.
4. artifact: the retrained tensors are written as a draft artifact (specd.models.artifact), loaded
   back the way the draft service loads it, and its greedy acceptance at depth k is measured on
   held-out prompts (never trained on) against the untrained truncated draft, together with the
   time of one draft token and one oracle token. The figures go into the manifest.

--device runs every stage on that device (the oracle's answers and features, training, the
measurement); what it writes is the same either way, and the manifest records the device, whose
ms figures these are.

Acceptance rate and mean acceptance length have the meanings defined in specd.verification.
Greedy acceptance is replayed from the oracle's greedy continuations (`replay_acceptance`), which
gives the same counts as a live drafter/verifier loop (`greedy_acceptance`) at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from specd.runtime.drafter import Drafter
from specd.runtime.verifier import Verifier
from specd.kernels.cpu_linear import onednn_available, use_cpu_linear
from specd.models.artifact import DraftManifest, save_draft_artifact, slice_output_head, trained_parameters
from specd.core.errors import InvalidArgument
from specd.models.feature_draft import FeatureDraftModel
from specd.runtime.kv import KVSession
from specd.core.defaults import EMBEDDED_ORACLE
from specd.models.pretrained import LoadedModel, check_device
from specd.models.loader import load_model
from specd.models.sources import resolve_source
from specd.core.sampling import SamplingParams
from specd.core.verification import acceptance_rate, mean_acceptance_length

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "distill_prompts.jsonl"
WORK_DIR = "work"  # under --out: cached answers, checkpoint, greedy continuations (not part of the artifact)


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    kind: str = ""

    @property
    def key(self) -> str:
        return json.dumps(self.messages, ensure_ascii=False)


def load_prompts(path: Path) -> list[Prompt]:
    """Read a JSONL prompt set: one object per line with "prompt" (a string) or "messages"
    (a list of {"role", "content"}), and an optional "kind"."""
    prompts: list[Prompt] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidArgument(f"cannot read prompts {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "messages" in row:
                messages = tuple((str(m["role"]), str(m["content"])) for m in row["messages"])
            else:
                messages = (("user", str(row["prompt"])),)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{path}:{number}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}") from exc
        prompts.append(Prompt(messages=messages, kind=str(row.get("kind", ""))))
    if not prompts:
        raise InvalidArgument(f"{path} holds no prompts")
    return prompts


def split_held_out(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic split into (training, held-out) by a hash of each prompt's text.

    The split depends on nothing but the text, so a prompt stays on its side whatever the seed,
    the order of the file, or the other prompts in it.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(f"--held-out must be in [0, 1), got {fraction}")

    def position(prompt: Prompt) -> float:
        return int(hashlib.sha256(prompt.key.encode()).hexdigest()[:12], 16) / float(1 << 48)

    train = [p for p in prompts if position(p) >= fraction]
    held_out = [p for p in prompts if position(p) < fraction]
    if fraction > 0 and not held_out and len(train) > 1:
        first = min(train, key=position)
        train.remove(first)
        held_out.append(first)
    if not train:
        raise InvalidArgument("no training prompts left after the held-out split")
    return train, held_out


def encode_prompt(loaded: LoadedModel, prompt: Prompt, max_tokens: int) -> list[int]:
    """Token ids of a prompt as the model sees it: chat template for chat models, else plain text."""
    tokenizer = loaded.tokenizer
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    return list(ids[-max_tokens:])


# ---------------------------------------------------------------------------------------------
# Stage 1: the oracle's answers and its distributions along them


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


# ---------------------------------------------------------------------------------------------
# Stage 2: the draft's output vocabulary


def choose_head_vocab(answers: list[OracleAnswer], size: int, eos_token_ids: list[int], vocab_size: int) -> list[int]:
    """The `size` tokens the oracle emits most often in its answers, plus eos; sorted by id.

    Ties (and the tail, when the answers hold fewer distinct tokens) are ranked by the
    probability mass the oracle gave each token over all answer positions.
    """
    if size <= 0 or size >= vocab_size:
        raise InvalidArgument(f"--head-vocab must be in 1..{vocab_size - 1} (or 0 for the full vocabulary), got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    for answer in answers:
        emitted = torch.tensor(answer.answer_ids, dtype=torch.long)
        counts.index_add_(0, emitted, torch.ones(len(emitted), dtype=torch.float64))
        mass.index_add_(0, answer.top_ids.flatten().long(), answer.top_logprobs.flatten().double().exp())
    # mass < number of positions, so it only orders tokens with equal counts.
    score = counts * (1 + sum(len(a.answer_ids) for a in answers)) + mass
    chosen = set(torch.topk(score, size).indices.tolist())
    chosen.update(eos_token_ids)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Stage 3: training


def distill_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, target_rows: torch.Tensor, target_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || q) of the oracle's distribution p and the draft's q at each answer position.

    p is known on its top-K tokens; the KL is taken over those tokens that the draft's head
    scores plus one bucket holding all remaining mass, a lower bound on the full KL that
    matches it when p's tail is small.
    hidden: [N, H] the draft's final hidden states; head_weight: [V_head, H];
    target_rows: [N, K] head rows of p's top-K tokens (-1: not in the head); target_logprobs: [N, K].
    Returns (loss, kl): cross-entropy to back-propagate (same gradient as the KL), and the KL.
    """
    logq = torch.log_softmax(hidden @ head_weight.T, dim=-1)  # [N, V_head]
    inside = target_rows >= 0  # [N, K]
    logp = target_logprobs.float()
    p = torch.where(inside, logp.exp(), 0.0)
    logq_k = logq.gather(1, target_rows.clamp(min=0))  # [N, K]
    rest_p = (1.0 - p.sum(1)).clamp(min=0.0)
    rest_q = (1.0 - torch.where(inside, logq_k.exp(), 0.0).sum(1)).clamp(min=1e-6)
    cross_entropy = -(p * logq_k).sum(1) - rest_p * rest_q.log()  # [N]
    neg_entropy = (p * torch.where(inside, logp, 0.0)).sum(1) + rest_p * rest_p.clamp(min=1e-12).log()
    return cross_entropy.mean(), (cross_entropy + neg_entropy).mean().detach()


@dataclass
class TrainingSet:
    """Teacher-forcing inputs: prompt + answer (minus its last token), and p at the answer positions."""

    inputs: list[torch.Tensor]  # [T] token ids
    first: list[int]  # position whose next token is the answer's first token (len(prompt) - 1)
    target_rows: list[torch.Tensor]  # [n, K] head rows of the oracle's top-K (-1: outside the head)
    target_logprobs: list[torch.Tensor]  # [n, K]

    @classmethod
    def build(cls, answers: list[OracleAnswer], head_token_ids: list[int] | None, vocab_size: int) -> TrainingSet:
        row_of = torch.arange(vocab_size, dtype=torch.long)
        if head_token_ids is not None:
            row_of = torch.full((vocab_size,), -1, dtype=torch.long)
            row_of[torch.tensor(head_token_ids)] = torch.arange(len(head_token_ids))
        data = cls([], [], [], [])
        for answer in answers:
            if not answer.answer_ids:
                continue
            sequence = answer.prompt_ids + answer.answer_ids[:-1]
            data.inputs.append(torch.tensor(sequence, dtype=torch.long))
            data.first.append(len(answer.prompt_ids) - 1)
            data.target_rows.append(row_of[answer.top_ids.long()])
            data.target_logprobs.append(answer.top_logprobs)
        if not data.inputs:
            raise InvalidArgument("the oracle produced no answer tokens to learn from")
        return data

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def answer_tokens(self) -> int:
        return sum(len(rows) for rows in self.target_rows)

    def collate(self, indices: list[int], device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Right-padded inputs [B, T], the answer positions (rows [N], columns [N]) and p's top-K [N, K]."""
        width = max(len(self.inputs[i]) for i in indices)
        input_ids = torch.zeros((len(indices), width), dtype=torch.long)
        rows, cols = [], []
        for b, i in enumerate(indices):
            input_ids[b, : len(self.inputs[i])] = self.inputs[i]
            n = len(self.target_rows[i])
            rows.append(torch.full((n,), b, dtype=torch.long))
            cols.append(torch.arange(self.first[i], self.first[i] + n))
        target_rows = torch.cat([self.target_rows[i] for i in indices])
        target_logprobs = torch.cat([self.target_logprobs[i] for i in indices])
        batch = (input_ids, torch.cat(rows), torch.cat(cols), target_rows, target_logprobs)
        return tuple(t.to(device) for t in batch) if device is not None else batch


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    minutes: float  # training time budget; 0: none
    batch_size: int
    lr: float
    seed: int
    checkpoint_every: int
    resume: bool


@dataclass
class TrainResult:
    steps: int
    tokens: int  # answer positions trained on, counting repeats
    seconds: float
    kl: float  # mean KL over the last steps


def _progress(step: int, seconds: float, settings: TrainSettings) -> float:
    """Fraction of the training done: by steps, or by the time budget if that runs out first.

    With neither a step count nor a time budget there is nothing to do (answers only).
    """
    if not settings.steps and not settings.minutes:
        return 1.0
    by_steps = step / settings.steps if settings.steps else 0.0
    by_time = seconds / (settings.minutes * 60) if settings.minutes else 0.0
    return max(by_steps, by_time)


def _learning_rate(step: int, progress: float, settings: TrainSettings) -> float:
    """Linear warmup over the first steps, then cosine decay to a tenth of --lr at the end."""
    warmup = max(1, min(20, settings.steps // 20)) if settings.steps else 20
    decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.lr * min(1.0, (step + 1) / warmup) * decay


def grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sequence indices for one epoch: shuffled, with similar lengths grouped (less padding)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * 8
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches.extend(chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


# One training step on a batch of sequence indices: (loss, answer positions, KL figures to show).
Step = Callable[[list[int]], tuple[torch.Tensor, int, dict[str, float]]]


def run_training(
    params: dict[str, torch.nn.Parameter], lengths: list[int], step_fn: Step, checkpoint: Path, identity: dict,
    settings: TrainSettings,
) -> TrainResult:
    """AdamW on `params` over epochs of grouped batches, with a progress bar, checkpoints and resume.

    The reported KL is the mean of the first figure step_fn returns, over the last 20 steps.
    """
    for param in params.values():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, seconds, tokens = 0, 0.0, 0
    recent: list[dict[str, float]] = []
    if settings.resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["identity"] == identity:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state["weights"][name])
            optimizer.load_state_dict(state["optimizer"])
            step, seconds, tokens, recent = state["step"], state["seconds"], state["tokens"], state["recent"]
            tqdm.write(f"resuming from {checkpoint} at step {step}")
        else:
            tqdm.write(f"{checkpoint} belongs to another configuration; training from the start")

    def save() -> None:
        state = {
            "identity": identity, "step": step, "seconds": seconds, "tokens": tokens, "recent": recent,
            "weights": {name: param.detach().clone() for name, param in params.items()},
            "optimizer": optimizer.state_dict(),
        }
        tmp = checkpoint.with_name(f".{checkpoint.name}.tmp{os.getpid()}")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    batches_per_epoch = len(grouped_batches(lengths, settings.batch_size, settings.seed, 0))
    epoch_number, batches = -1, []
    saved_at = step
    with tqdm(total=settings.steps or None, initial=step, desc="distill", unit="step", dynamic_ncols=True) as bar:
        while _progress(step, seconds, settings) < 1.0:
            started = time.perf_counter()
            if step // batches_per_epoch != epoch_number:
                epoch_number = step // batches_per_epoch
                batches = grouped_batches(lengths, settings.batch_size, settings.seed, epoch_number)
            lr = _learning_rate(step, _progress(step, seconds, settings), settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, positions, figures = step_fn(batches[step % batches_per_epoch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            step += 1
            tokens += positions
            seconds += time.perf_counter() - started
            recent = (recent + [figures])[-20:]
            bar.update(1)
            shown = {name: f"{statistics.fmean(r[name] for r in recent):.3f}" for name in figures}
            bar.set_postfix(**shown, lr=f"{lr:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            if step - saved_at >= settings.checkpoint_every:
                save()
                saved_at = step
    if step != saved_at or not checkpoint.exists():
        save()
    for param in params.values():
        param.requires_grad_(False)
    first = next(iter(recent[-1])) if recent else None
    kl = statistics.fmean(r[first] for r in recent) if recent else float("nan")
    return TrainResult(steps=step, tokens=tokens, seconds=seconds, kl=kl)


def train_draft(
    model: torch.nn.Module, data: TrainingSet, head_weight: torch.Tensor, checkpoint: Path, identity: dict,
    settings: TrainSettings,
) -> TrainResult:
    """Retrain the kept layers and the final norm of `model` on KL(oracle || draft)."""
    params = trained_parameters(model)
    for param in model.parameters():
        param.requires_grad_(False)
    decoder = model.get_decoder()
    head_weight = head_weight.detach()

    def step(indices: list[int]) -> tuple[torch.Tensor, int, dict[str, float]]:
        input_ids, rows, cols, target_rows, target_logprobs = data.collate(indices, head_weight.device)
        # Right padding under a causal mask: no real position attends to padding, so no mask is needed.
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, H]
        loss, kl = distill_loss(hidden[rows, cols], head_weight, target_rows, target_logprobs)
        return loss, len(rows), {"kl": float(kl)}

    model.train()
    try:
        return run_training(params, [len(x) for x in data.inputs], step, checkpoint, identity, settings)
    finally:
        model.eval()


# ---------------------------------------------------------------------------------------------
# Stage 4: evaluation


@dataclass(frozen=True)
class AcceptanceReport:
    prompts: int
    rounds: int
    drafted: int
    accepted: int
    committed: int  # tokens generated: accepted + the oracle's own token per round

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.accepted, self.drafted)

    @property
    def mean_acceptance_length(self) -> float:
        return mean_acceptance_length(self.accepted, self.rounds)


def greedy_acceptance(
    draft: LoadedModel, oracle: LoadedModel, prompts: list[list[int]], *, k: int = 4, max_new_tokens: int = 96,
    desc: str = "acceptance",
) -> AcceptanceReport:
    """Greedy speculative decoding of each prompt with the real drafter and verifier, counting acceptances."""
    limits = {"max_sessions": 1, "session_ttl_seconds": 3600.0, "max_depth": k}
    drafter, verifier = Drafter(draft, **limits), Verifier(oracle, **limits)
    context = min(draft.max_context, oracle.max_context)
    eos = set(oracle.eos_token_ids)
    rounds = drafted = accepted = committed = 0
    for number, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", dynamic_ncols=True, leave=False)):
        session = f"{desc}-{number}"
        opened = verifier.open(session, prompt, SamplingParams(), return_features=drafter.feature_dim > 0)
        drafter.open(session, prompt, SamplingParams(), features=opened.features)
        append: list[int] = []
        features = None
        produced = 0
        while produced < max_new_tokens and len(prompt) + produced + k + 1 <= context:
            proposal = drafter.propose(session, append, 0, k, features)
            result = verifier.verify(session, proposal.tokens, [], 0)
            verdict, features = result.verdict, result.features
            append = verdict.committed(proposal.tokens)
            rounds += 1
            drafted += k
            accepted += verdict.accepted
            produced += len(append)
            if eos.intersection(append):
                break
        committed += produced
        drafter.close(session)
        verifier.close(session)
    return AcceptanceReport(
        prompts=len(prompts), rounds=rounds, drafted=drafted, accepted=accepted, committed=committed
    )


@torch.inference_mode()
def greedy_continuations(
    oracle: LoadedModel, prompts: list[list[int]], length: int, batch_size: int = 16
) -> list[list[int]]:
    """The oracle's greedy continuation of each prompt, `length` tokens, not stopping at eos.

    Greedy speculative decoding is lossless, so these are exactly the tokens any draft's session
    commits; they are computed once and shared by every draft that is evaluated.
    """
    continuations: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = _pad_id(oracle)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="oracle greedy", unit="batch", dynamic_ncols=True, leave=False):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [batch, width], left-padded
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        input_ids, mask = input_ids.to(oracle.device), mask.to(oracle.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        for _ in range(length):
            out = oracle.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1,
            )
            input_ids = out.logits[:, -1, : oracle.vocab_size].argmax(-1, keepdim=True)  # [batch, 1]
            mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
            positions = positions[:, -1:] + 1
            for i, token in zip(batch, input_ids[:, 0].tolist()):
                continuations[i].append(token)
    return continuations


@torch.inference_mode()
def draft_guesses(draft: LoadedModel, prompt: list[int], continuation: list[int]) -> list[int]:
    """The draft's greedy token for each position of the continuation, teacher-forced along it."""
    ids = torch.tensor([prompt + continuation], dtype=torch.long, device=draft.device)  # [1, T]
    rows = draft.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1).cpu()  # [len(continuation)]
    if draft.head_token_ids is not None:
        rows = torch.tensor(draft.head_token_ids)[rows]
    return rows.tolist()


def token_agreement(draft: LoadedModel, prompts: list[list[int]], continuations: list[list[int]], length: int) -> float:
    """Fraction of positions on the oracle's greedy path where the draft's greedy token is the oracle's.

    This is the per-token acceptance probability (alpha of Leviathan et al.) of greedy decoding,
    the quantity in E(k) = (1 - alpha^(k+1)) / (1 - alpha); the acceptance rate counts the draft
    tokens after a round's first rejection as drafted too, so it is lower for the same draft.
    """
    matches = total = 0
    for prompt, continuation in zip(prompts, continuations):
        guesses = draft_guesses(draft, prompt, continuation[:length])
        matches += sum(g == t for g, t in zip(guesses, continuation[:length]))
        total += len(guesses)
    return matches / total if total else 0.0


@torch.inference_mode()
def replay_acceptance(
    draft: LoadedModel, prompts: list[list[int]], continuations: list[list[int]], *, eos_token_ids: list[int],
    k: int, max_new_tokens: int, context: int,
) -> AcceptanceReport:
    """Greedy acceptance at depth k, replayed from the oracle's greedy continuations.

    In a greedy session every committed token is the oracle's greedy token, so the draft's
    proposal in a round is its own greedy prediction along that same sequence, for as long as
    it matches. One teacher-forced pass of the draft over prompt + continuation therefore gives
    each round's accepted count: the run of positions where the draft's argmax equals the
    oracle's token, capped at k. The rounds follow `greedy_acceptance` exactly (same stopping
    rules); the unit tests check that both give the same counts.
    """
    eos = set(eos_token_ids)
    rounds = drafted = accepted = committed = 0
    for prompt, continuation in zip(prompts, continuations):
        if len(continuation) < max_new_tokens + k:
            raise ValueError("each continuation needs max_new_tokens + k tokens")
        guesses = draft_guesses(draft, prompt, continuation)
        produced = 0
        while produced < max_new_tokens and len(prompt) + produced + k + 1 <= context:
            m = 0
            while m < k and guesses[produced + m] == continuation[produced + m]:
                m += 1
            block = continuation[produced : produced + m + 1]
            rounds += 1
            drafted += k
            accepted += m
            produced += m + 1
            if eos.intersection(block):
                break
        committed += produced
    return AcceptanceReport(
        prompts=len(prompts), rounds=rounds, drafted=drafted, accepted=accepted, committed=committed
    )


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a timer reads the work rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_token(models: list[LoadedModel], prompt: list[int], *, rounds: int = 7, reps: int = 8) -> list[float]:
    """Median time of one single-token forward pass with a KV cache, for each model, in ms.

    Rounds alternate between the models so that a change in machine load hits all of them alike.
    """
    sessions = []
    for loaded in models:
        kv = KVSession(loaded.model, loaded.device)
        kv.forward(prompt[:-1])
        sessions.append(kv)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for kv, samples in zip(sessions, times):
            for _ in range(reps):
                started = time.perf_counter()
                kv.forward(prompt[-1:])
                synchronize(kv.device)
                samples.append(time.perf_counter() - started)
                kv.rollback(len(prompt) - 1)
    return [1000 * statistics.median(samples) for samples in times]


# ---------------------------------------------------------------------------------------------
# The command


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill",
        help="train a small draft for an oracle (offline; CPU or CUDA)",
        description="Distil a draft from an oracle: its first layers retrained on KL(oracle || draft) "
        "over the oracle's own answers. Writes a draft artifact directory the draft service loads by path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--oracle", default=EMBEDDED_ORACLE, help="the oracle's model source")
    parser.add_argument("--out", required=True, type=Path, help="artifact directory (work files go to OUT/work)")
    parser.add_argument(
        "--kind", choices=["layers", "features"], default="layers",
        help="layers: the oracle's first --layers layers, reading tokens alone; features: one layer reading the "
        "oracle's final hidden states, which the oracle returns with each verdict (llama-style oracles)",
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers the draft keeps from the oracle")
    parser.add_argument(
        "--unroll", type=int, default=2,
        help="features: training passes; pass n reads the draft's own features from n - 1 steps before, as the "
        "n-th token of a block does (1: real features only)",
    )
    parser.add_argument("--head-vocab", type=int, default=0, help="tokens the draft's output head scores (0: all)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL prompt set")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of prompts kept for evaluation only")
    parser.add_argument("--answers-per-prompt", type=int, default=1, help="sampled oracle answers per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest oracle answer")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the oracle's answers")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the oracle's answers")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="prompts per batched oracle generate")
    parser.add_argument("--targets", type=int, default=64, help="top-K tokens of the oracle kept per answer position")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget in minutes (0: none)")
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps (0: no limit); training ends at --steps or --minutes"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="answers per training step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the oracle's sampling and the data order")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue from the checkpoint in OUT/work (the oracle's cached answers are reused either way)",
    )
    parser.add_argument("--eval-prompts", type=int, default=64, help="most held-out prompts used to measure acceptance")
    parser.add_argument("--eval-tokens", type=int, default=96, help="tokens generated per held-out prompt")
    parser.add_argument("--k", type=int, default=4, help="draft depth for the acceptance measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--device", default="cpu",
        help="where the oracle answers, records its features and the draft trains and is measured: cpu, cuda, "
        "cuda:N (the artifact is the same kind either way; its ms figures are that device's)",
    )
    parser.set_defaults(func=run)
    return parser


def _portable_source(source: str) -> str:
    """The oracle source to record in the manifest: local paths made absolute, names kept."""
    _, path = resolve_source(source)
    return str(path.resolve()) if path is not None and source != EMBEDDED_ORACLE else source


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)  # before any work
    if args.layers < 1:
        raise InvalidArgument("--layers must be at least 1")
    if args.unroll < 1:
        raise InvalidArgument("--unroll must be at least 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise InvalidArgument("the oracle's answers are sampled: --temperature must be > 0 and --top-p in (0, 1]")
    out: Path = args.out
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    oracle = load_model(args.oracle, device=str(device))
    if oracle.device.type == "cpu" and onednn_available():
        # The oracle only runs inference here (its answers, its features, the held-out measurement), so
        # it multiplies as a worker does: on 2 CPU cores that took a quarter off the measurement.
        use_cpu_linear(oracle.model, "onednn")
    prompts = load_prompts(args.prompts)
    train_prompts, held_out = split_held_out(prompts, args.held_out)
    max_prompt = max(16, oracle.max_context - args.max_new_tokens - 1)
    settings = AnswerSettings(
        oracle=_portable_source(args.oracle),
        prompts_sha256=hashlib.sha256(json.dumps([p.key for p in train_prompts]).encode()).hexdigest(),
        held_out=args.held_out,
        answers_per_prompt=args.answers_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.gen_batch_size,
        targets=args.targets,
        seed=args.seed,
    )
    train_ids = [encode_prompt(oracle, p, max_prompt) for p in train_prompts]
    answers = oracle_answers(oracle, train_ids, work / "answers", settings)

    head_ids = None
    if args.head_vocab:
        head_ids = choose_head_vocab(answers, args.head_vocab, oracle.eos_token_ids, oracle.vocab_size)
    train_settings = TrainSettings(
        steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
    )
    identity = {
        "answers": hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest(),
        "kind": args.kind,
        "layers": args.layers,
        "head": hashlib.sha256(json.dumps(head_ids).encode()).hexdigest(),
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    if args.kind == "features":
        from specd.training.feature_distill import oracle_features, train_feature_draft

        identity["unroll"] = args.unroll
        data = oracle_features(
            oracle, answers, work / "features", head_token_ids=head_ids, targets=args.targets,
            batch_size=args.gen_batch_size // 4 or 1,
        )
        model = FeatureDraftModel(oracle.model, head_ids).to(device)
        tqdm.write(
            f"training a feature draft on {data.answer_tokens} answer tokens from {len(train_prompts)} prompts "
            f"({len(held_out)} held out); head: {len(head_ids) if head_ids else oracle.vocab_size} tokens"
        )
        result = train_feature_draft(model, data, work / "checkpoint.pt", identity, train_settings, passes=args.unroll)
        layers, answer_tokens = 1, data.answer_tokens
    else:
        draft = load_model(args.oracle, layers=args.layers, device=str(device))
        if head_ids is not None:
            slice_output_head(draft.model, head_ids)
        data = TrainingSet.build(answers, head_ids, oracle.vocab_size)
        tqdm.write(
            f"training a {args.layers}-layer draft on {data.answer_tokens} answer tokens from {len(train_prompts)} "
            f"prompts ({len(held_out)} held out); head: {len(head_ids) if head_ids else oracle.vocab_size} tokens"
        )
        model = draft.model
        result = train_draft(
            model, data, model.get_output_embeddings().weight, work / "checkpoint.pt", identity, train_settings
        )
        layers, answer_tokens = args.layers, data.answer_tokens

    manifest = DraftManifest(
        base=_portable_source(args.oracle),
        layers=layers,
        vocab_fingerprint=oracle.vocab_fingerprint,
        head_token_ids=head_ids,
        kind=args.kind,
        training={
            "seed": args.seed,
            "steps": result.steps,
            "tokens": result.tokens,
            "answer_tokens": answer_tokens,
            "answers": len(data),
            "train_prompts": len(train_prompts),
            "held_out_prompts": len(held_out),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "final_kl": round(result.kl, 4) if math.isfinite(result.kl) else None,
            "training_minutes": round(result.seconds / 60, 2),
            "answer_settings": {k: v for k, v in asdict(settings).items() if k not in ("oracle", "prompts_sha256")},
            **({"unroll": args.unroll} if args.kind == "features" else {}),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    )
    save_draft_artifact(out, model, manifest)
    del model

    # Measure what ships: the artifact as the draft service loads it.
    shipped = load_model(str(out), device=str(device))
    eval_prompts = [encode_prompt(oracle, p, max_prompt) for p in held_out[: args.eval_prompts]]
    figures: dict = {"k": args.k, "eval_prompts": len(eval_prompts), "eval_tokens": args.eval_tokens}
    if eval_prompts and args.kind == "features":
        figures.update(_evaluate_feature_draft(shipped, oracle, eval_prompts, head_ids, args, work))
    elif eval_prompts:
        untrained = load_model(args.oracle, layers=args.layers, device=str(device))
        continuations = _cached_continuations(oracle, eval_prompts, args.eval_tokens + args.k, work / "greedy.json")
        replay = {
            "eos_token_ids": oracle.eos_token_ids, "k": args.k, "max_new_tokens": args.eval_tokens,
            "context": oracle.max_context,
        }
        trained = replay_acceptance(shipped, eval_prompts, continuations, **replay)
        baseline = replay_acceptance(untrained, eval_prompts, continuations, **replay)
        agreement = [token_agreement(d, eval_prompts, continuations, args.eval_tokens) for d in (shipped, untrained)]
        timing = [shipped, untrained, oracle]
        draft_ms, untrained_ms, oracle_ms = ms_per_token(timing, max(eval_prompts, key=len))
        figures.update(_figures(trained, baseline, agreement, draft_ms, oracle_ms))
        figures["full_head_draft_ms_per_token"] = round(untrained_ms, 2)
    figures["answering_minutes"] = round(answering_seconds(work / "answers") / 60, 2)
    figures["this_run_minutes"] = round((time.perf_counter() - started) / 60, 2)
    manifest.training.update(figures)
    manifest.write(out)

    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    print(f"draft artifact: {out} ({size_mb:.1f} MB), {result.steps} steps, {result.tokens} tokens, "
          f"{result.seconds / 60:.1f} min training, final KL {result.kl:.3f}")
    if eval_prompts:
        print(
            f"held-out greedy acceptance (k={args.k}, {len(eval_prompts)} prompts): "
            f"{figures['held_out_acceptance']:.3f} distilled vs {figures['untrained_acceptance']:.3f} untrained; "
            f"mean acceptance length {figures['held_out_mean_acceptance_length']:.2f}; per-token agreement "
            f"{figures['held_out_token_agreement']:.3f} vs {figures['untrained_token_agreement']:.3f}"
        )
        if args.kind == "features":
            print(
                f"ms per token: draft {figures['draft_ms_per_token']:.2f}, oracle {figures['oracle_ms_per_token']:.2f} "
                f"(draft/oracle {figures['cost_ratio']:.3f})"
            )
        else:
            print(
                f"ms per token: draft {figures['draft_ms_per_token']:.2f}, full-head {args.layers}-layer draft "
                f"{figures['full_head_draft_ms_per_token']:.2f}, oracle {figures['oracle_ms_per_token']:.2f} "
                f"(draft/oracle {figures['cost_ratio']:.3f})"
            )
    return 0


def _evaluate_feature_draft(
    shipped: LoadedModel, oracle: LoadedModel, prompts: list[list[int]], head_ids: list[int] | None,
    args: argparse.Namespace, work: Path,
) -> dict:
    """Live greedy acceptance (a feature draft's later guesses read its own features, so there is
    no replay) against the untrained draft, first-token agreement, and the cost of one draft step."""
    from specd.training.feature_distill import first_token_agreement, step_ms

    untrained = dataclasses.replace(shipped, model=FeatureDraftModel(oracle.model, head_ids).to(oracle.device).eval())
    trained = greedy_acceptance(shipped, oracle, prompts, k=args.k, max_new_tokens=args.eval_tokens, desc="trained")
    baseline = greedy_acceptance(
        untrained, oracle, prompts, k=args.k, max_new_tokens=args.eval_tokens, desc="untrained"
    )
    continuations = _cached_continuations(oracle, prompts, args.eval_tokens + args.k, work / "greedy.json")
    agreement = [first_token_agreement(d, oracle, prompts, continuations, args.eval_tokens) for d in (shipped, untrained)]
    longest = max(prompts, key=len)
    draft_ms = step_ms(shipped, oracle, longest)
    (oracle_ms,) = ms_per_token([oracle], longest)
    return _figures(trained, baseline, agreement, draft_ms, oracle_ms)


def _figures(
    trained: AcceptanceReport, untrained: AcceptanceReport, agreement: list[float], draft_ms: float, oracle_ms: float
) -> dict:
    """The held-out figures a manifest records, trained draft against untrained."""
    return dict(
        held_out_acceptance=round(trained.acceptance_rate, 4),
        held_out_mean_acceptance_length=round(trained.mean_acceptance_length, 3),
        untrained_acceptance=round(untrained.acceptance_rate, 4),
        untrained_mean_acceptance_length=round(untrained.mean_acceptance_length, 3),
        held_out_token_agreement=round(agreement[0], 4),
        untrained_token_agreement=round(agreement[1], 4),
        draft_ms_per_token=round(draft_ms, 2),
        oracle_ms_per_token=round(oracle_ms, 2),
        cost_ratio=round(draft_ms / oracle_ms, 3),
    )


def _cached_continuations(oracle: LoadedModel, prompts: list[list[int]], length: int, cache: Path) -> list[list[int]]:
    """The oracle's greedy continuations of the held-out prompts, computed once per prompt set."""
    key = hashlib.sha256(json.dumps([prompts, length, oracle.model_id, oracle.vocab_fingerprint]).encode()).hexdigest()
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["continuations"]
    continuations = greedy_continuations(oracle, prompts, length)
    cache.write_text(json.dumps({"key": key, "continuations": continuations}))
    return continuations
