"""Stages 2 and 3 of `specd distill`, the data side: the draft's output vocabulary (the tokens the oracle
emits most often), the distillation loss KL(p || q) and the teacher-forced training set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specd.core.errors import InvalidArgument
from specd.training.answers import OracleAnswer


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
