"""Stage 4 of `specd distill`: the draft's greedy acceptance on held-out prompts, replayed from the oracle's
greedy continuations (the same counts as a live drafter/verifier loop, `greedy_acceptance`, at a fraction of the
cost), token agreement, and the time of a draft token and an oracle token."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import DynamicCache

from specd.core.sampling import SamplingParams
from specd.core.verification import acceptance_rate, mean_acceptance_length
from specd.models.pretrained import LoadedModel
from specd.runtime.drafter import Drafter
from specd.runtime.kv import KVSession
from specd.runtime.verifier import Verifier
from specd.training.answers import _pad_id
from specd.training.trainer import synchronize


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
        opened = verifier.open(
            session, prompt, SamplingParams(), return_features=drafter.feature_dim > 0,
            feature_layers=draft.feature_layers,
        )
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
