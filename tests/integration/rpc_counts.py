"""The servers' `grpc_server_handled_total` counter as the in-process tests read it."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY


def handled(service: str, method: str, code: str) -> float:
    labels = {"grpc_service": service, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def handled_soon(service: str, method: str, code: str, expected: float) -> float:
    """The counter once it reaches `expected` (at most ~2 s later). A call that ends with an error status is
    counted as the server's handler unwinds, which can be just after the client has the status."""
    for _ in range(200):
        if handled(service, method, code) >= expected:
            break
        await asyncio.sleep(0.01)
    return handled(service, method, code)
