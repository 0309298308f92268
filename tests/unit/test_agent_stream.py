"""gpu.agent.stream: the reconnect backoff and how a stream's end is read."""

from __future__ import annotations

import grpc
from far.gpu.v1 import gpu_service_pb2

from gpu.agent.stream import Backoff, StreamOutcome

Closed = gpu_service_pb2.StreamClosed


class TestBackoff:
    def test_one_second_doubling_to_one_minute(self) -> None:
        backoff = Backoff()
        assert [backoff.next() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]

    def test_reset_starts_again_from_one_second(self) -> None:
        backoff = Backoff()
        for _ in range(5):
            backoff.next()
        backoff.reset()
        assert backoff.next() == 1


class TestOutcome:
    def test_deregistered_and_superseded_are_final(self) -> None:
        assert StreamOutcome(closed=Closed.REASON_DEREGISTERED).final
        assert StreamOutcome(closed=Closed.REASON_SUPERSEDED).final

    def test_other_ends_reconnect(self) -> None:
        for reason in (Closed.REASON_CLIENT_CLOSED, Closed.REASON_IDLE, Closed.REASON_SERVER_SHUTDOWN):
            assert not StreamOutcome(closed=reason).final
        assert not StreamOutcome(error=grpc.StatusCode.UNAVAILABLE).final
        assert not StreamOutcome().final

    def test_describe_names_the_reason_or_the_error(self) -> None:
        assert StreamOutcome(closed=Closed.REASON_IDLE).describe() == "REASON_IDLE"
        assert StreamOutcome(error=grpc.StatusCode.UNAUTHENTICATED).describe() == "UNAUTHENTICATED"
        assert StreamOutcome().describe() == "ENDED"
