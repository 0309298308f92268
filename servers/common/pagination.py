"""AIP-158 pagination: page sizes and opaque, tamper-proof page tokens bound to the request's filters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from servers.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
_MAC_BYTES = 16


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default, larger than `maximum` is coerced down, negative is INVALID_ARGUMENT."""
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    if value == 0:
        return default
    return min(value, maximum)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Signs and checks page tokens.

    A token carries a cursor (the sort key of the last item served) and a fingerprint of the request's
    filters and order, signed with HMAC-SHA256. A token that was altered, or is replayed with other
    filters, is INVALID_ARGUMENT, so the server never trusts a cursor the caller made up.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must be at least 16 bytes")
        self._secret = secret

    @staticmethod
    def scope(*parts: object) -> str:
        """A fingerprint of the request parameters a token is valid for (filters, order, parent)."""
        digest = hashlib.sha256(json.dumps(parts, default=str, separators=(",", ":")).encode())
        return digest.hexdigest()[:16]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, cursor: Mapping[str, Any], *, scope: str) -> str:
        payload = json.dumps({"s": scope, "c": cursor}, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, token: str, *, scope: str) -> dict[str, Any] | None:
        """The cursor of `token`; None for the empty token (the first page)."""
        if not token:
            return None
        invalid = InvalidArgument.field("page_token", "is not a token this list returned for these parameters")
        try:
            payload_part, mac_part = token.split(".", 1)
            payload, mac = _unb64(payload_part), _unb64(mac_part)
        except (ValueError, binascii.Error) as exc:
            raise invalid from exc
        # Only the canonical encoding: base64 decoding ignores unused trailing bits, so without this
        # check several different strings would be the same token.
        if _b64(payload) != payload_part or _b64(mac) != mac_part or not hmac.compare_digest(mac, self._mac(payload)):
            raise invalid
        data = json.loads(payload)
        if data.get("s") != scope or not isinstance(data.get("c"), dict):
            raise invalid
        cursor: dict[str, Any] = data["c"]
        return cursor
