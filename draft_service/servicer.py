"""specd.v1.DraftService: protobuf in, Drafter calls, protobuf out."""

from __future__ import annotations

import grpc

from draft_service.config import DraftConfig
from specd.core.stopping import StopRule
from specd.rpc.features import features_from_proto
from specd.rpc.host import grpc_errors
from specd.rpc.worker_servicer import WorkerServicerMixin, session_id_from
from specd.runtime.drafter import Drafter
from specd.runtime.engine import DraftEngine
from specd.runtime.executor import ModelExecutor
from specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


class DraftServicer(WorkerServicerMixin, draft_pb2_grpc.DraftServiceServicer):
    role = common_pb2.WORKER_ROLE_DRAFT
    open_response = draft_pb2.OpenDraftSessionResponse
    engine_type = DraftEngine
    worker: Drafter
    engine: DraftEngine

    def __init__(self, drafter: Drafter, executor: ModelExecutor, config: DraftConfig):
        super().__init__(drafter, executor, config)

    def open_options(self, request: draft_pb2.OpenDraftSessionRequest) -> dict:
        return {"features": features_from_proto(request.features), "cache_namespace": request.cache_namespace}

    @grpc_errors
    async def Propose(self, request: draft_pb2.ProposeRequest, context: grpc.aio.ServicerContext) -> draft_pb2.Proposal:
        session_id = session_id_from(request)
        proposal = await self.guard_session(
            session_id,
            self.engine.propose(
                session_id,
                list(request.append_token_ids),
                request.committed_length,
                request.depth,
                features_from_proto(request.features),
                stop_rule_from_proto(request),
                request.tree_width,
            ),
        )
        self.metrics.forward.labels("propose").observe(proposal.seconds)
        return draft_pb2.Proposal(
            token_ids=proposal.tokens,
            distributions=[
                common_pb2.TokenDistribution(token_ids=d.token_ids, probs=d.probs) for d in proposal.distributions
            ],
            draft_seconds=proposal.seconds,
            lookup_positions=proposal.looked_up,
            lookup_lengths=proposal.lookup_lengths,
            confidences=proposal.confidences,
            model_steps=proposal.model_steps,
            parents=proposal.parents,
        )


def stop_rule_from_proto(request: draft_pb2.ProposeRequest) -> StopRule | None:
    if not request.HasField("stop"):
        return None
    rule = request.stop
    return StopRule(
        rule.min_survival, tuple(rule.calibration), rule.lookup_acceptance, rule.extend_survival,
        tuple(rule.lookup_by_length), tuple(rule.alternative_calibration),
    )
