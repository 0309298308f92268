"""Per-request context shared by interceptors and services: the request id and the caller."""

from __future__ import annotations

from contextvars import ContextVar

from servers.common.auth import ANONYMOUS, Principal

request_id_var: ContextVar[str] = ContextVar("far_request_id", default="-")
principal_var: ContextVar[Principal] = ContextVar("far_principal", default=ANONYMOUS)


def current_request_id() -> str:
    return request_id_var.get()


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (ANONYMOUS when no token was sent)."""
    return principal_var.get()
