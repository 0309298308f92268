"""Reading the google.rpc.Status a FAR server puts in `grpc-status-details-bin`, and asserting on it."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class RichError(NamedTuple):
    """A failed call's code with its ErrorInfo and, for INVALID_ARGUMENT, its BadRequest."""

    code: grpc.StatusCode
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None

    @property
    def reason(self) -> str:
        return str(self.info.reason)

    @property
    def fields(self) -> list[str]:
        """The fields the BadRequest names, in its order (empty without one)."""
        if self.bad_request is None:
            return []
        return [violation.field for violation in self.bad_request.field_violations]


def rich_error(exc: grpc.aio.AioRpcError) -> RichError:
    """The code, ErrorInfo and BadRequest (or None) of a failed call; AssertionError without an ErrorInfo."""
    status = rpc_status.from_call(exc)
    assert status is not None, f"{exc.code().name} without grpc-status-details-bin: {exc.details()}"
    info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    assert info is not None, f"{exc.code().name} without an ErrorInfo: {exc.details()}"
    return RichError(exc.code(), info, bad_request)


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str | None = None,
    *,
    fields: Iterable[str] | None = None,
    domain: str = "gamed.far.network",
) -> RichError:
    """Await `call`, which must fail with `code`, an ErrorInfo of `domain` and `reason` (the code's name by default).

    INVALID_ARGUMENT must carry a BadRequest; with `fields`, it must name exactly those fields.
    """
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        error = rich_error(exc)
    else:
        raise AssertionError(f"expected {code.name}, the call succeeded: {response}")
    assert error.code == code, f"expected {code.name}, got {error.code.name}: {error.info}"
    assert error.info.domain == domain, error.info
    assert error.reason == (reason or code.name), error.info
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error.bad_request is not None, "INVALID_ARGUMENT without a google.rpc.BadRequest"
        assert all(v.description for v in error.bad_request.field_violations)
    if fields is not None:
        assert sorted(error.fields) == sorted(fields), error.fields
    return error
