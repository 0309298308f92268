"""Request validation that reports every bad field at once (google.rpc.BadRequest)."""

from __future__ import annotations

import re

from servers.common.errors import FieldViolation, InvalidArgument

# \Z, not $: `$` also matches before a trailing newline, so "abc\n" would pass.
RESOURCE_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
WALLET_ADDRESS = re.compile(r"^0x[0-9a-f]{40}\Z")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
RESOURCE_ID_RULE = "must be 1-63 lower-case letters, digits or hyphens, start with a letter, not end with '-'"


class Violations:
    """Collects field violations; `raise_if_any()` turns them into one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def require(self, value: object, field: str) -> bool:
        """Record a violation when `value` is empty; returns whether it was present."""
        if not value:
            self.add(field, "is required")
            return False
        return True

    def check_length(self, value: str, field: str, *, maximum: int, minimum: int = 0) -> None:
        if not minimum <= len(value) <= maximum:
            self.add(field, f"must be {minimum}-{maximum} characters long (got {len(value)})")

    def check_resource_id(self, value: str, field: str) -> None:
        if not RESOURCE_ID.match(value):
            self.add(field, RESOURCE_ID_RULE)

    def raise_if_any(self, message: str = "the request has invalid fields") -> None:
        if self.items:
            fields = ", ".join(v.field for v in self.items)
            raise InvalidArgument(f"{message}: {fields}", violations=self.items)


def normalize_wallet(value: str, field: str) -> str:
    """A wallet address in canonical form (0x + 40 lower-case hex) or INVALID_ARGUMENT."""
    candidate = value.strip().lower()
    if not WALLET_ADDRESS.match(candidate):
        raise InvalidArgument.field(field, "must be a 0x-prefixed 20-byte hex address")
    return candidate
