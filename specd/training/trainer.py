"""Stage 3 of `specd distill`: a training loop with a time or step budget, a cosine learning rate and
checkpoints (a rerun continues from the last), used by both kinds of draft."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specd.models.artifact import trained_parameters
from specd.training.dataset import TrainingSet, distill_loss


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


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a timer reads the work rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
