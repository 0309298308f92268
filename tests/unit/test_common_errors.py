"""servers.common.errors: the one mapping from domain errors to google.rpc.Status."""

from __future__ import annotations

from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from servers.common.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    internal_status,
    status_code,
    to_rpc_status,
)

DOMAIN = "gamed.far.network"
M = TypeVar("M", bound=Message)


def unpack(status: status_pb2.Status, index: int, message_type: type[M]) -> M:
    detail = message_type()
    assert status.details[index].Unpack(detail), f"detail {index} is {status.details[index].type_url}"
    return detail


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (InvalidArgument("bad"), code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (Unauthenticated("who"), code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (PermissionDenied("no"), code_pb2.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (NotFound("gone"), code_pb2.NOT_FOUND, "NOT_FOUND"),
        (AlreadyExists("dup"), code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (FailedPrecondition("state"), code_pb2.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (Aborted("race"), code_pb2.ABORTED, "ABORTED"),
        (ResourceExhausted("slow down"), code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (Unavailable("later"), code_pb2.UNAVAILABLE, "UNAVAILABLE"),
        (DomainError("plain"), code_pb2.UNKNOWN, "ERROR"),
    ],
)
def test_each_error_has_its_code_and_error_info_first(error: DomainError, code: int, reason: str) -> None:
    status = to_rpc_status(error, DOMAIN)
    assert status.code == code
    assert status.message == error.message
    assert len(status.details) == 1
    info = unpack(status, 0, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (reason, DOMAIN, {})


def test_status_code_agrees_with_the_status_number() -> None:
    assert status_code(NotFound("x")) is grpc.StatusCode.NOT_FOUND
    assert status_code(DomainError("x")) is grpc.StatusCode.UNKNOWN


def test_a_subclass_maps_to_its_nearest_mapped_class() -> None:
    class EtagMismatch(Aborted):
        default_reason = "ETAG_MISMATCH"

    status = to_rpc_status(EtagMismatch("stale", metadata={"etag": "abc"}), DOMAIN)
    assert status.code == code_pb2.ABORTED
    info = unpack(status, 0, error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("ETAG_MISMATCH", {"etag": "abc"})


def test_reason_and_metadata_are_carried() -> None:
    error = NotFound("no such game", reason="GAME_NOT_FOUND", metadata={"name": "games/chess"})
    info = unpack(to_rpc_status(error, DOMAIN), 0, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == ("GAME_NOT_FOUND", DOMAIN, {"name": "games/chess"})


class TestInvalidArgument:
    def test_field_violations_follow_error_info(self) -> None:
        error = InvalidArgument(
            "two bad fields",
            violations=[FieldViolation("game.display_name", "is required"), FieldViolation("game_id", "too long")],
        )
        status = to_rpc_status(error, DOMAIN)
        assert status.code == code_pb2.INVALID_ARGUMENT
        assert len(status.details) == 2
        assert unpack(status, 0, error_details_pb2.ErrorInfo).reason == "INVALID_ARGUMENT"
        bad_request = unpack(status, 1, error_details_pb2.BadRequest)
        assert [(v.field, v.description) for v in bad_request.field_violations] == [
            ("game.display_name", "is required"),
            ("game_id", "too long"),
        ]

    def test_field_shortcut(self) -> None:
        error = InvalidArgument.field("page_size", "must not be negative")
        assert error.message == "page_size: must not be negative"
        assert error.violations == [FieldViolation("page_size", "must not be negative")]

    def test_no_violations_no_bad_request(self) -> None:
        assert len(to_rpc_status(InvalidArgument(), DOMAIN).details) == 1


class TestResourceExhausted:
    def test_retry_info_carries_the_delay(self) -> None:
        status = to_rpc_status(ResourceExhausted("too many uploads", retry_after_s=1.5), DOMAIN)
        assert len(status.details) == 2
        assert unpack(status, 0, error_details_pb2.ErrorInfo).reason == "RESOURCE_EXHAUSTED"
        retry = unpack(status, 1, error_details_pb2.RetryInfo)
        assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 500_000_000)

    def test_no_delay_no_retry_info(self) -> None:
        assert len(to_rpc_status(ResourceExhausted("quota"), DOMAIN).details) == 1


def test_internal_status_has_the_request_id_and_nothing_else() -> None:
    status = internal_status(DOMAIN, "req-42")
    assert status.code == code_pb2.INTERNAL
    assert status.message == "internal error (request id req-42)"
    assert len(status.details) == 1
    info = unpack(status, 0, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == ("INTERNAL", DOMAIN, {"request_id": "req-42"})
