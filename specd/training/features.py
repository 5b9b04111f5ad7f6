"""Distilling a feature draft (specd.models.feature_draft): `specd distill --kind features`.

Shares stage 1 (the oracle's answers) and stage 2 (the head vocabulary) with the layer drafts
(specd.training.answers, specd.training.dataset).
Then:

3a. features: one teacher-forced pass of the oracle over each prompt + answer records its final
    hidden state f_j at every position and its top-K next-token distribution there (cached
    under work/features, per chunk).
3b. training: the draft reads (f_j, x_{j+1}) at position j and is trained so that g_j = draft(...)
    matches the oracle one position later: KL(p_{j+1} || head(g_j)) on the answer positions.
    Further passes (--unroll) feed the draft its own g_{j-1} in place of f_j, as happens from
    the second token of every block on, and are trained the same way. Two recipes (`RECIPES`):

    "eagle": the oracle's final state alone, a regression of g_j onto f_{j+1} beside the KL,
      and each further pass reruns the whole sequence on the previous pass's features, so the
      keys a position attends to were made from draft features too.
    "eagle3" (EAGLE-3, Li et al. 2025): a low, a middle and the final hidden state of the oracle,
      a norm of the draft's own before the head, and training-time test: step n attends exactly
      as the (n+1)-th token of a block does at serving time, to the keys of real features up to
      n positions back and to the keys its own chain of draft features made at the steps
      between (`ttt_mask`). EAGLE-3 trains on the KL alone; here a regression of every step's g
      onto the oracle's next final state stays beside it (`--feature-regression`, weight 1 by
      default), which paid at the budgets measured (docs/default-pair.md).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from specd.core.errors import InvalidArgument
from specd.models.feature_draft import FeatureDraftModel
from specd.models.pretrained import LoadedModel
from specd.runtime.feature_session import FeatureSession
from specd.training.answers import OracleAnswer
from specd.training.dataset import distill_loss
from specd.training.trainer import TrainResult, TrainSettings, run_training, synchronize

REGRESSION_WEIGHT = 1.0  # the "eagle" recipe's feature regression, on features scaled to unit RMS
RECIPES = ("eagle", "eagle3")


def recipe_layers(recipe: str, oracle_layers: int) -> tuple[int, ...]:
    """The oracle hidden states a recipe's draft reads: "eagle3" a low, a middle and the final one."""
    if recipe == "eagle3":
        return tuple(sorted({min(2, oracle_layers), oracle_layers // 2, oracle_layers}))
    return ()


def oracle_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """The oracle's features along input_ids [B, T]: its final state [B, T, H] (layers empty), or the hidden
    states `layers` joined [B, T, H * len(layers)] (specd.models.feature_draft numbers them)."""
    return _joined(decoder(input_ids=input_ids, use_cache=False, output_hidden_states=bool(layers)), layers)


def _joined(out: Any, layers: tuple[int, ...]) -> torch.Tensor:
    """A decoder output's features: its final state, or the hidden states `layers` side by side."""
    return torch.cat([out.hidden_states[i] for i in layers], dim=-1) if layers else out.last_hidden_state


@dataclass
class FeatureSet:
    """Per answer: prompt + answer ids [T], the oracle's features [T, W] (its final state, or several layers'
    joined) and top-K [T, K] along them."""

    ids: list[torch.Tensor]
    features: list[torch.Tensor]  # float16
    top_rows: list[torch.Tensor]  # head rows of the top-K tokens (-1: outside the head)
    top_logprobs: list[torch.Tensor]
    first: list[int]  # the first draft position with a target on the answer: len(prompt) - 2
    scale: float = 1.0  # RMS of the last state read (the final one), so the regression weight does not depend on the oracle

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        return self.ids[0].device

    def to(self, device: torch.device) -> FeatureSet:
        """The same set with every tensor on `device` (a GPU trains faster with the whole set on it)."""
        def move(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in tensors]

        return FeatureSet(
            move(self.ids), move(self.features), move(self.top_rows), move(self.top_logprobs), self.first, self.scale
        )

    @property
    def answer_tokens(self) -> int:
        return sum(len(ids) - 2 - first for ids, first in zip(self.ids, self.first))

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Right-padded draft inputs and the loss positions.

        Returns features [B, T-1, W] (f_0..f_{T-2}), next ids [B, T-1] (x_1..x_{T-1}), feature targets
        [B, T-1, W] (f_1..f_{T-1}), loss positions (rows [N], cols [N]) and their top-K targets [N, K].
        """
        width = max(len(self.ids[i]) for i in indices) - 1
        hidden = self.features[indices[0]].shape[1]
        device = self.device
        features = torch.zeros(len(indices), width, hidden, device=device)
        targets = torch.zeros(len(indices), width, hidden, device=device)
        next_ids = torch.zeros(len(indices), width, dtype=torch.long, device=device)
        rows, cols, top_rows, top_logprobs = [], [], [], []
        for b, i in enumerate(indices):
            n = len(self.ids[i]) - 1
            features[b, :n] = self.features[i][:-1].float()
            targets[b, :n] = self.features[i][1:].float()
            next_ids[b, :n] = self.ids[i][1:]
            # Draft position j predicts x_{j+2} from the oracle's distribution at j+1; keep the answer's.
            positions = torch.arange(self.first[i], n - 1, device=device)
            rows.append(torch.full((len(positions),), b, dtype=torch.long, device=device))
            cols.append(positions)
            top_rows.append(self.top_rows[i][positions + 1])
            top_logprobs.append(self.top_logprobs[i][positions + 1])
        return (
            features, next_ids, targets, torch.cat(rows), torch.cat(cols), torch.cat(top_rows), torch.cat(top_logprobs)
        )


@torch.inference_mode()
def oracle_features(
    oracle: LoadedModel, answers: list[OracleAnswer], cache: Path, *, head_token_ids: list[int] | None, targets: int,
    batch_size: int = 16, layers: tuple[int, ...] = (),
) -> FeatureSet:
    """Teacher-forced oracle passes over prompt + answer, cached per chunk of answers; the features are the
    hidden states `layers` (empty: the final state)."""
    row_of = torch.arange(oracle.vocab_size, dtype=torch.long)
    if head_token_ids is not None:
        row_of = torch.full((oracle.vocab_size,), -1, dtype=torch.long)
        row_of[torch.tensor(head_token_ids)] = torch.arange(len(head_token_ids))
    usable = [a for a in answers if len(a.answer_ids) >= 2 and len(a.prompt_ids) >= 2]
    if not usable:
        raise InvalidArgument("the oracle produced no answers long enough to learn from")
    cache.mkdir(parents=True, exist_ok=True)
    decoder, head = oracle.model.get_decoder(), oracle.model.get_output_embeddings()
    data = FeatureSet([], [], [], [], [])
    chunks = range(0, len(usable), batch_size)
    for number, start in enumerate(tqdm(chunks, desc="oracle features", unit="batch", dynamic_ncols=True)):
        chunk = usable[start : start + batch_size]
        path = cache / f"chunk-{number:05d}.pt"
        sequences = [a.prompt_ids + a.answer_ids for a in chunk]
        if path.exists():
            records = torch.load(path, weights_only=True)
        else:
            width = max(len(s) for s in sequences)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, sequence in enumerate(sequences):
                input_ids[b, : len(sequence)] = torch.tensor(sequence)
            # Right padding under a causal mask: no real position attends to padding.
            out = decoder(input_ids=input_ids.to(oracle.device), use_cache=False, output_hidden_states=bool(layers))
            hidden = _joined(out, layers)  # [B, T, W]
            logprobs = torch.log_softmax(head(out.last_hidden_state)[..., : oracle.vocab_size].float(), dim=-1)
            top = torch.topk(logprobs, min(targets, oracle.vocab_size), dim=-1)
            records = [
                {
                    "features": hidden[b, : len(s)].to("cpu", torch.float16).clone(),
                    "top_ids": top.indices[b, : len(s)].to("cpu", torch.int32).clone(),
                    "top_logprobs": top.values[b, : len(s)].to("cpu", torch.float16).clone(),
                }
                for b, s in enumerate(sequences)
            ]
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            torch.save(records, tmp)
            tmp.replace(path)
        for answer, sequence, record in zip(chunk, sequences, records):
            data.ids.append(torch.tensor(sequence, dtype=torch.long))
            data.features.append(record["features"])
            data.top_rows.append(row_of[record["top_ids"].long()])
            data.top_logprobs.append(record["top_logprobs"])
            data.first.append(len(answer.prompt_ids) - 2)
    hidden = oracle.model.config.hidden_size
    sample = torch.cat(data.features[:64])[:, -hidden:].float()  # the last state read: the final one, as recipes list it
    data.scale = float(sample.pow(2).mean().sqrt())
    return data


def ttt_mask(length: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """[1, 1, T, (step + 1) * T] bool: what position j of training-time-test step `step` attends to, over the keys
    of steps 0..step side by side: step 0's (real features) at positions up to j - step, and step m's at
    position j - step + m, its own chain of draft features; as the (step + 1)-th token of a block does."""
    j = torch.arange(length, device=device)[:, None]
    p = torch.arange(length, device=device)[None, :]
    blocks = [p <= j - step] + [p == j - step + m for m in range(1, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def _ttt_losses(
    model: FeatureDraftModel, steps: int, features: torch.Tensor, next_ids: torch.Tensor, targets: torch.Tensor,
    rows: torch.Tensor, cols: torch.Tensor, top_rows: torch.Tensor, top_logprobs: torch.Tensor, scale: float,
    regression: float = 0.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The "eagle3" recipe: (loss to back-propagate, the KL of each step). Step n's positions read the draft's
    own features of step n - 1 one position back (position 0, which has none, its real one), with the keys of
    every earlier step in one cache under `ttt_mask`; a position counts from step n on only when a chain of n
    draft features lies behind it (col >= n). `regression`: the weight of each step's regression of g onto the
    oracle's next final state (the last state the features join)."""
    length = features.shape[1]
    positions = torch.arange(length, device=features.device)[None].expand(features.shape[0], -1)
    cache = DynamicCache()
    total, kls = 0.0, []
    for step in range(steps):
        mask = ttt_mask(length, step, features.device).expand(features.shape[0], -1, -1, -1)
        g, _ = model(features, next_ids, positions, cache, logits="none", mask=mask)
        keep = cols >= step
        hidden = g[rows[keep], cols[keep]]
        if regression:
            target = targets[rows[keep], cols[keep], -model.hidden_size :]
            total = total + regression * F.smooth_l1_loss(hidden / scale, target / scale)
        if model.norm is not None:
            hidden = model.norm(hidden)
        loss, kl = distill_loss(hidden, model.head.weight, top_rows[keep], top_logprobs[keep])
        total = total + loss
        kls.append(kl)
        if step == 0:
            first = model.feature_input(features[:, :1])
        features = torch.cat([first, g[:, :-1]], dim=1)
    return total, kls


def _losses(
    model: FeatureDraftModel, passes: int, features: torch.Tensor, next_ids: torch.Tensor, targets: torch.Tensor,
    rows: torch.Tensor, cols: torch.Tensor, top_rows: torch.Tensor, top_logprobs: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The "eagle" recipe: (loss to back-propagate, the KL of each pass)."""
    positions = torch.arange(features.shape[1], device=features.device)[None].expand(features.shape[0], -1)
    total, kls = 0.0, []
    for number in range(passes):
        g, _ = model(features, next_ids, positions, logits="none")
        loss, kl = distill_loss(g[rows, cols], model.head.weight, top_rows, top_logprobs)
        regression = F.smooth_l1_loss(g[rows, cols] / scale, targets[rows, cols] / scale)
        total = total + loss + REGRESSION_WEIGHT * regression
        kls.append(kl)
        # The next pass reads the draft's own features: g_{j-1} in place of f_j from position `number + 1`
        # on (earlier positions keep what this pass read, as the first tokens of a block do).
        features = torch.cat([features[:, : number + 1], g[:, number:-1]], dim=1)
    return total, kls


def train_feature_draft(
    model: FeatureDraftModel, data: FeatureSet, checkpoint: Path, identity: dict, settings: TrainSettings,
    *, passes: int = 2, recipe: str = "eagle", regression: float = 0.0,
) -> TrainResult:
    """Train what a feature draft trains (its fuse projection and layer; reduce and norm where it has them),
    unrolled over `passes` passes (steps of training-time test for "eagle3")."""
    if passes < 1:
        raise InvalidArgument(f"a feature draft trains in at least one pass, got {passes}")
    if recipe not in RECIPES:
        raise InvalidArgument(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    if recipe == "eagle3":
        def losses(*batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return _ttt_losses(*batch, regression=regression)
        if model.norm is not None:
            with torch.no_grad():  # norm(g) = g where g has the final state's scale: the plain draft's start
                model.norm.weight.fill_(data.scale)
    else:
        losses = _losses
    for param in model.parameters():
        param.requires_grad_(False)
    data = data.to(model.fuse.weight.device)

    def step(indices: list[int]) -> tuple[torch.Tensor, int, dict[str, float]]:
        batch = data.collate(indices)
        loss, kls = losses(model, passes, *batch, data.scale)
        shown = {"kl": float(kls[0])}
        if passes > 1:
            shown[f"kl{passes}"] = float(kls[-1])
        return loss, len(batch[3]), shown

    model.train()
    try:
        return run_training(
            model.trained_parameters(), [len(ids) for ids in data.ids], step, checkpoint, identity, settings
        )
    finally:
        model.eval()


@torch.inference_mode()
def first_token_agreement(
    draft: LoadedModel, oracle: LoadedModel, prompts: list[list[int]], continuations: list[list[int]], length: int
) -> float:
    """Fraction of positions on the oracle's greedy path where the draft's first guess is the oracle's token.

    The draft reads the oracle's real features along prompt + continuation, as it does for the
    first token of every block.
    """
    model: FeatureDraftModel = draft.model
    decoder = oracle.model.get_decoder()
    matches = total = 0
    for prompt, continuation in zip(prompts, continuations):
        sequence = prompt + continuation[:length]
        ids = torch.tensor([sequence], device=oracle.device)
        features = oracle_hidden(decoder, ids, model.feature_layers)  # [1, T, W]
        positions = torch.arange(len(sequence) - 1, device=oracle.device)[None]
        _, logits = model(features[:, :-1], ids[:, 1:], positions)
        guesses = logits[0].argmax(-1).cpu()  # draft position j guesses x_{j+2}
        if draft.head_token_ids is not None:
            guesses = torch.tensor(draft.head_token_ids)[guesses]
        guesses = guesses[len(prompt) - 2 : len(prompt) - 2 + length].tolist()  # for continuation[:length]
        truth = continuation[:length]
        matches += sum(g == t for g, t in zip(guesses, truth))
        total += len(truth)
    return matches / total if total else 0.0


@torch.inference_mode()
def step_ms(draft: LoadedModel, oracle: LoadedModel, prompt: list[int], *, reps: int = 40) -> float:
    """Median time of one speculative draft step (one token) after the prompt, in ms."""
    ids = torch.tensor([prompt[:-1]], device=oracle.device)
    rows = oracle_hidden(oracle.model.get_decoder(), ids, draft.model.feature_layers)[0]
    state = FeatureSession(draft.model, draft.device)
    state.receive(0, rows)
    state.catch_up(prompt)
    g = state.last[0]
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        state.step(g, prompt[-1])
        synchronize(draft.device)
        samples.append(time.perf_counter() - started)
        state.catch_up(prompt)
    return 1000 * statistics.median(samples)
