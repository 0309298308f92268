"""Identities: access JWTs (HS256 with key ids for rotation), principals and roles, wallet signatures."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import jwt

from servers.common.errors import PermissionDenied, Unauthenticated


class Role(StrEnum):
    USER = "user"
    PUBLISHER = "publisher"
    ORGANIZER = "organizer"
    REVIEWER = "reviewer"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a signed-in account (subject = wallet address) or nobody (anonymous)."""

    subject: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    token_id: str = ""
    expires_at: float = 0.0

    @property
    def is_authenticated(self) -> bool:
        return bool(self.subject)

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def has_any_role(self, *roles: Role) -> bool:
        return any(role in self.roles for role in roles)


ANONYMOUS = Principal()


def require_signed_in(principal: Principal) -> Principal:
    """UNAUTHENTICATED unless a valid token came with the call."""
    if not principal.is_authenticated:
        raise Unauthenticated("this method needs a signed-in account (Authorization: Bearer <token>)")
    return principal


def require_role(principal: Principal, *roles: Role) -> Principal:
    """UNAUTHENTICATED for anonymous callers, PERMISSION_DENIED unless the caller has one of `roles` or admin."""
    require_signed_in(principal)
    if not principal.has_any_role(*roles, Role.ADMIN):
        wanted = " or ".join(role.value for role in roles)
        raise PermissionDenied(f"this method needs the {wanted} role", reason="MISSING_ROLE")
    return principal


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """HS256 keys by key id: `current_kid` signs; every key verifies (so a secret can rotate)."""

    current_kid: str
    secrets: Mapping[str, str]
    issuer: str = "far-auth"
    audience: str = "far-platform"

    def __post_init__(self) -> None:
        if self.current_kid not in self.secrets:
            raise ValueError(f"no secret for the current key id {self.current_kid!r}")


class TokenVerifier:
    """Verifies access tokens and turns their claims into a Principal."""

    def __init__(self, keys: JwtKeys, *, leeway_s: float = 5.0) -> None:
        self._keys = keys
        self._leeway = leeway_s

    def verify(self, token: str) -> Principal:
        try:
            kid = jwt.get_unverified_header(token).get("kid", self._keys.current_kid)
            secret = self._keys.secrets.get(kid)
            if secret is None:
                raise Unauthenticated("the access token was signed with an unknown key", reason="TOKEN_INVALID")
            claims: dict[str, Any] = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                audience=self._keys.audience,
                issuer=self._keys.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the access token is not valid", reason="TOKEN_INVALID") from exc
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("the access token's roles claim is malformed", reason="TOKEN_INVALID")
        return Principal(
            subject=str(claims["sub"]).lower(),
            roles=frozenset(roles),
            token_id=str(claims["jti"]),
            expires_at=float(claims["exp"]),
        )


class TokenIssuer:
    """Signs access tokens with the current key (used by the auth service, and by tests)."""

    def __init__(self, keys: JwtKeys) -> None:
        self._keys = keys

    def issue(self, subject: str, roles: Iterable[str], *, ttl_s: float = 900.0) -> str:
        now = int(time.time())
        claims = {
            "iss": self._keys.issuer,
            "aud": self._keys.audience,
            "sub": subject.lower(),
            "roles": sorted(set(roles)),
            "iat": now,
            "exp": now + int(ttl_s),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims,
            self._keys.secrets[self._keys.current_kid],
            algorithm="HS256",
            headers={"kid": self._keys.current_kid},
        )


def recover_wallet(message: str, signature: str) -> str:
    """The address (lower-case) that signed `message` with EIP-191 personal_sign."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        address: str = Account.recover_message(encode_defunct(text=message), signature=signature)
    except Exception as exc:  # eth_account raises several unrelated types for bad signatures
        raise Unauthenticated("the signature does not verify", reason="BAD_SIGNATURE") from exc
    return address.lower()
