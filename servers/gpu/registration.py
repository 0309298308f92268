"""Registration proofs: the message the operator signs, its checks, single-use nonces, and agent tokens."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from servers.common.auth import recover_wallet
from servers.common.errors import DomainError, FieldViolation, InvalidArgument, PermissionDenied

CLOCK_SKEW = timedelta(minutes=1)
MAX_VALIDITY = timedelta(minutes=10)
NONCE = re.compile(r"^[A-Za-z0-9]{16,64}\Z")
AGENT_TOKEN_PREFIX = "fna_"  # noqa: S105 - a prefix, not a secret


@dataclass(frozen=True)
class RegistrationProof:
    node_id: str
    endpoint: str
    operator: str
    chain_id: int
    nonce: str
    issue_time: datetime
    expire_time: datetime
    signature: str


def rfc3339(value: datetime) -> str:
    """`2026-11-25T10:00:00Z`: whole seconds, UTC, as the signed message writes times."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def registration_text(
    *,
    node_id: str,
    endpoint: str,
    operator: str,
    chain_id: int,
    nonce: str,
    issue_time: datetime,
    expire_time: datetime,
) -> str:
    """The EIP-191 text the operator signs, exactly as the contract spells it out (the node agent signs this
    same text: one definition for both sides)."""
    return "\n".join(
        (
            "far.network GPU node registration",
            f"Node: nodes/{node_id}",
            f"Endpoint: {endpoint}",
            f"Operator: {operator}",
            f"Chain ID: {chain_id}",
            f"Nonce: {nonce}",
            f"Issued At: {rfc3339(issue_time)}",
            f"Expiration Time: {rfc3339(expire_time)}",
        )
    )


def registration_message(proof: RegistrationProof) -> str:
    """The text `proof` claims to sign."""
    return registration_text(
        node_id=proof.node_id,
        endpoint=proof.endpoint,
        operator=proof.operator,
        chain_id=proof.chain_id,
        nonce=proof.nonce,
        issue_time=proof.issue_time,
        expire_time=proof.expire_time,
    )


def verify_proof(proof: RegistrationProof, *, chain_id: int, now: datetime) -> None:
    """PERMISSION_DENIED `SIGNATURE_INVALID` or INVALID_ARGUMENT `SIGNATURE_EXPIRED` unless the proof holds."""
    if proof.chain_id != chain_id:
        raise InvalidArgument.field("chain_id", f"must be the platform's chain id {chain_id}")
    if proof.expire_time - proof.issue_time > MAX_VALIDITY or proof.expire_time <= proof.issue_time:
        raise InvalidArgument.field("expire_time", "must be after issue_time, by at most 10 minutes")
    try:
        signer = recover_wallet(registration_message(proof), proof.signature)
    except DomainError:
        signer = ""
    if signer != proof.operator:
        raise PermissionDenied(
            "the signature does not recover to the operator's wallet for this registration message",
            reason="SIGNATURE_INVALID",
        )
    if not proof.issue_time - CLOCK_SKEW <= now < proof.expire_time:
        field = "expire_time" if now >= proof.expire_time else "issue_time"
        raise InvalidArgument(
            "the signed registration is not valid now (issue_time is in the future or expire_time has passed)",
            reason="SIGNATURE_EXPIRED",
            violations=[FieldViolation(field, "the signed registration is not valid at the service's time")],
        )


class NonceRegistry:
    """Nonces used once per operator: `<prefix>gpu:nonce:<operator>:<nonce>` kept past the proof's expiry."""

    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}gpu:nonce:"

    async def was_used(self, operator: str, nonce: str) -> bool:
        return bool(await self._redis.exists(f"{self._prefix}{operator}:{nonce}"))

    async def consume(self, operator: str, nonce: str, *, ttl: timedelta) -> None:
        """Mark the nonce used; INVALID_ARGUMENT `NONCE_REUSED` when it already was."""
        seconds = max(1, int(ttl.total_seconds()) + 1)
        if not await self._redis.set(f"{self._prefix}{operator}:{nonce}", b"1", nx=True, ex=seconds):
            raise nonce_reused()


def nonce_reused() -> InvalidArgument:
    return InvalidArgument(
        "the nonce was used before; sign a new registration",
        reason="NONCE_REUSED",
        violations=[FieldViolation("nonce", "was used before")],
    )


def new_agent_token() -> str:
    """An opaque URL-safe credential: `fna_` + 43 random characters."""
    return AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database keeps of an agent token (SHA-256: the token itself is 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()
