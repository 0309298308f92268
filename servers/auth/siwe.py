"""EIP-4361 ("Sign-In with Ethereum") messages: the text the service issues, and a strict parser for it.

Only the message format lives here; what a message must say to be accepted is the sessions module's
business. The grammar is the EIP's ABNF, written out line by line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from eth_utils.address import is_checksum_address

STATEMENT = "Sign in to FAR."
_PREAMBLE = " wants you to sign in with your Ethereum account:"
_HEADER = re.compile(r"^(?:(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://)?(?P<domain>[^\s/?#]+)\Z")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:[\x21-\x7e]+\Z")
_NONCE = re.compile(r"^[a-zA-Z0-9]{8,}\Z")
_CHAIN_ID = re.compile(r"^[1-9][0-9]{0,18}\Z")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})\Z", re.ASCII)
_REQUEST_ID = re.compile(r"^[\x21-\x7e]*\Z")


class MessageSyntaxError(ValueError):
    """The text is not an EIP-4361 message; the message says which part is wrong."""


@dataclass(frozen=True)
class SiweMessage:
    """The fields of an EIP-4361 message, as written in it."""

    domain: str
    address: str
    uri: str
    version: str
    chain_id: int
    nonce: str
    issued_at: datetime
    scheme: str | None = None
    statement: str | None = None
    expiration_time: datetime | None = None
    not_before: datetime | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = ()


def rfc3339(value: datetime) -> str:
    """`2026-11-25T04:05:13Z`: UTC, whole seconds (the service issues whole-second times)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_message(message: SiweMessage) -> str:
    """The message text, lines separated by "\\n", optional fields only when set."""
    lines = [
        f"{message.scheme + '://' if message.scheme else ''}{message.domain}{_PREAMBLE}",
        message.address,
        "",
    ]
    if message.statement is not None:
        lines += [message.statement, ""]
    else:
        lines += [""]
    lines += [
        f"URI: {message.uri}",
        f"Version: {message.version}",
        f"Chain ID: {message.chain_id}",
        f"Nonce: {message.nonce}",
        f"Issued At: {rfc3339(message.issued_at)}",
    ]
    if message.expiration_time is not None:
        lines.append(f"Expiration Time: {rfc3339(message.expiration_time)}")
    if message.not_before is not None:
        lines.append(f"Not Before: {rfc3339(message.not_before)}")
    if message.request_id is not None:
        lines.append(f"Request ID: {message.request_id}")
    if message.resources:
        lines.append("Resources:")
        lines += [f"- {resource}" for resource in message.resources]
    return "\n".join(lines)


def _time(value: str, field: str) -> datetime:
    if not _RFC3339.match(value):
        raise MessageSyntaxError(f"{field} must be an RFC 3339 date-time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MessageSyntaxError(f"{field} must be an RFC 3339 date-time") from None
    return parsed.astimezone(UTC)


class _Lines:
    def __init__(self, text: str) -> None:
        self._lines = text.split("\n")
        self._next = 0

    def peek(self) -> str | None:
        return self._lines[self._next] if self._next < len(self._lines) else None

    def take(self, what: str) -> str:
        line = self.peek()
        if line is None:
            raise MessageSyntaxError(f"the message ends before its {what}")
        self._next += 1
        return line

    def field(self, label: str) -> str:
        line = self.take(f"'{label}:' line")
        if not line.startswith(f"{label}: "):
            raise MessageSyntaxError(f"expected the '{label}:' line, found {line[:40]!r}")
        return line[len(label) + 2 :]

    def optional_field(self, label: str) -> str | None:
        line = self.peek()
        if line is None or not line.startswith(f"{label}: "):
            return None
        return self.field(label)


def parse_message(text: str) -> SiweMessage:
    """The fields of `text`, or MessageSyntaxError; lines end with "\\n" only (no "\\r")."""
    if "\r" in text:
        raise MessageSyntaxError("lines must be separated by \\n alone")
    lines = _Lines(text)
    header = lines.take("first line")
    if not header.endswith(_PREAMBLE):
        raise MessageSyntaxError(f"the first line must end with '{_PREAMBLE.strip()}'")
    match = _HEADER.match(header[: -len(_PREAMBLE)])
    if match is None:
        raise MessageSyntaxError("the first line must start with the requesting domain")
    address = lines.take("address")
    if not _ADDRESS.match(address):
        raise MessageSyntaxError("the second line must be the 0x-prefixed 20-byte address")
    if not is_checksum_address(address):
        raise MessageSyntaxError("the address must be EIP-55 checksummed")
    if lines.take("blank line after the address") != "":
        raise MessageSyntaxError("the address must be followed by a blank line")
    statement: str | None = None
    line = lines.take("URI")
    if line != "":
        if line.startswith("URI: "):
            raise MessageSyntaxError("without a statement, the address must be followed by two blank lines")
        statement = line
        if lines.take("blank line after the statement") != "":
            raise MessageSyntaxError("the statement must be followed by a blank line")
    uri = lines.field("URI")
    if not _URI.match(uri):
        raise MessageSyntaxError("URI must be an RFC 3986 URI")
    version = lines.field("Version")
    if version != "1":
        raise MessageSyntaxError("Version must be 1")
    chain_id = lines.field("Chain ID")
    if not _CHAIN_ID.match(chain_id):
        raise MessageSyntaxError("Chain ID must be a positive decimal integer")
    nonce = lines.field("Nonce")
    if not _NONCE.match(nonce):
        raise MessageSyntaxError("Nonce must be at least 8 letters or digits")
    issued_at = _time(lines.field("Issued At"), "Issued At")
    expiration = lines.optional_field("Expiration Time")
    not_before = lines.optional_field("Not Before")
    request_id = lines.optional_field("Request ID")
    if request_id is not None and not _REQUEST_ID.match(request_id):
        raise MessageSyntaxError("Request ID must be printable characters without spaces")
    resources: list[str] = []
    if lines.peek() == "Resources:":
        lines.take("resources")
        while (item := lines.peek()) is not None and item.startswith("- "):
            resource = lines.take("resource")[2:]
            if not _URI.match(resource):
                raise MessageSyntaxError("each resource must be an RFC 3986 URI")
            resources.append(resource)
    rest = lines.peek()
    if rest is not None:
        raise MessageSyntaxError(f"unexpected line {rest[:40]!r}")
    return SiweMessage(
        scheme=match.group("scheme"),
        domain=match.group("domain"),
        address=address,
        statement=statement,
        uri=uri,
        version=version,
        chain_id=int(chain_id),
        nonce=nonce,
        issued_at=issued_at,
        expiration_time=_time(expiration, "Expiration Time") if expiration is not None else None,
        not_before=_time(not_before, "Not Before") if not_before is not None else None,
        request_id=request_id,
        resources=tuple(resources),
    )
