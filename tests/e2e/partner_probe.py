"""A stand-in gaming server for the partner mTLS tests: `python -m tests.e2e.partner_probe`.

It serves `far.gaming.v1.GamingService` through the same `servers.common.server.run` as every server (so
with mTLS, the auth and access interceptors and the contract's access declarations: SubmitScore admits the
`game-server` partner and admins), and its SubmitScore echoes the caller the platform identified into the
record's `metadata`, so a test can see which principal reached the service. Other methods: UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
from far.gaming.v1 import gaming_service_pb2, leaderboard_pb2

from servers.common.context import current_principal
from servers.common.server import Runtime, ServiceSpec, run

Response = gaming_service_pb2.SubmitScoreResponse
SERVICE = gaming_service_pb2.DESCRIPTOR.services_by_name["GamingService"].full_name


async def submit_score(
    request: gaming_service_pb2.SubmitScoreRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> gaming_service_pb2.SubmitScoreResponse:
    caller = current_principal()
    record = leaderboard_pb2.LeaderboardRecord(
        name=f"{request.name}/periods/probe/records/{request.wallet}",
        wallet=request.wallet,
        score=request.score,
        submission_count=1,
    )
    record.metadata.update({"partner": caller.partner, "service": caller.service, "subject": caller.subject})
    return Response(record=record, outcome=Response.OUTCOME_RECORD_CREATED)


async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        submit_score,
        request_deserializer=gaming_service_pb2.SubmitScoreRequest.FromString,
        response_serializer=Response.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"SubmitScore": handler}),))


SPEC = ServiceSpec(
    name="gaming",
    default_port=0,
    service_names=[SERVICE],
    setup=setup,
    uses_database=False,
    uses_redis=False,
)

if __name__ == "__main__":
    run(SPEC)
