"""Per-request context shared by interceptors and services: the request id, the caller, when the call arrived."""

from __future__ import annotations

from contextvars import ContextVar

from servers.common.auth import ANONYMOUS, Principal

request_id_var: ContextVar[str] = ContextVar("far_request_id", default="-")
principal_var: ContextVar[Principal] = ContextVar("far_principal", default=ANONYMOUS)
call_started_var: ContextVar[float] = ContextVar("far_call_started", default=0.0)


def current_request_id() -> str:
    return request_id_var.get()


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (ANONYMOUS when no token was sent)."""
    return principal_var.get()


def call_started() -> float:
    """`time.monotonic()` when the first interceptor saw the current RPC (0.0 outside one)."""
    return call_started_var.get()
