"""Forming a draft/oracle pair: fetch both workers' info and refuse a pair specd.core.compat finds fault with."""

from __future__ import annotations

from coordinator.session.clients import DraftClient, OracleClient
from coordinator.session.generation import Pair, TextCodec
from specd.core.compat import check_pair, pair_id


async def connect_pair(oracle_address: str, draft_address: str | None, codec: TextCodec | None = None) -> Pair:
    """Connect to an oracle and (optionally) a draft; raises IncompatiblePair on mismatch."""
    oracle = OracleClient(oracle_address)
    draft = DraftClient(draft_address) if draft_address else None
    try:
        oracle_info = await oracle.info()
        max_depth = 0
        if draft is not None:
            draft_info = await draft.info()
            check_pair(draft_info, oracle_info)
            max_depth = min(draft_info.max_depth, oracle_info.max_depth)
        if codec is None:
            codec = TextCodec(await oracle.tokenizer())
    except BaseException:
        await oracle.close()
        if draft is not None:
            await draft.close()
        raise
    return Pair.build(oracle, draft, codec, oracle_info, max_depth, pair_id(draft_address or "", oracle_address))
