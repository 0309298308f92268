"""servers.common.db URL helpers: the asyncpg URL, the plain URL, and redaction for logs."""

from __future__ import annotations

import pytest

from servers.common.db import async_url, redact, sync_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5432/far", "postgresql+asyncpg://u:p@h:5432/far"),
        ("postgres://u@h/far", "postgresql+asyncpg://u@h/far"),
        ("postgresql+asyncpg://u@h/far", "postgresql+asyncpg://u@h/far"),
        ("postgresql://postgres@/far?host=/tmp/pg", "postgresql+asyncpg://postgres@/far?host=/tmp/pg"),
    ],
)
def test_async_url(url: str, expected: str) -> None:
    assert async_url(url) == expected


def test_sync_url() -> None:
    assert sync_url("postgresql+asyncpg://u@h/far?host=/tmp") == "postgresql://u@h/far?host=/tmp"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://far:s3cret@db:5432/far", "postgresql://far:***@db:5432/far"),
        ("postgresql://far@db/far", "postgresql://far@db/far"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected
