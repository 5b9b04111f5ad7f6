"""Forming a draft/oracle pair: fetch both workers' info, refuse a vocabulary or feature-width mismatch."""

from __future__ import annotations

from coordinator.generation import Pair, TextCodec
from coordinator.workers import DraftClient, OracleClient
from specd.errors import IncompatiblePair
from specd.models import check_pair
from specd.v1 import common_pb2


def check_infos(draft: common_pb2.ModelInfo, oracle: common_pb2.ModelInfo) -> None:
    check_pair(draft.vocab_fingerprint, draft.vocab_size, oracle.vocab_fingerprint, oracle.vocab_size)
    if draft.feature_dim and draft.feature_dim != oracle.feature_dim:
        raise IncompatiblePair(
            f"the draft reads oracle features of width {draft.feature_dim}, but this oracle's are "
            f"{oracle.feature_dim} wide; a feature draft pairs only with the oracle it was distilled from"
        )


async def connect_pair(oracle_address: str, draft_address: str | None, codec: TextCodec | None = None) -> Pair:
    """Connect to an oracle and (optionally) a draft; raises IncompatiblePair on mismatch."""
    oracle = OracleClient(oracle_address)
    draft = DraftClient(draft_address) if draft_address else None
    try:
        oracle_info = await oracle.info()
        max_depth = 0
        if draft is not None:
            draft_info = await draft.info()
            check_infos(draft_info, oracle_info)
            max_depth = min(draft_info.max_depth, oracle_info.max_depth)
        if codec is None:
            codec = TextCodec(await oracle.tokenizer())
    except BaseException:
        await oracle.close()
        if draft is not None:
            await draft.close()
        raise
    return Pair.build(oracle, draft, codec, oracle_info, max_depth, f"{draft_address or '-'}->{oracle_address}")
