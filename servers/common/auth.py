"""Identities: access JWTs (HS256 with key ids for rotation), principals and roles, wallet signatures,
and the revocation list that refuses signed-out tokens before they expire."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from servers.common.errors import PermissionDenied, Unauthenticated, Unavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis


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
    session_id: str = ""
    """The auth session the token belongs to (its `sid` claim); empty for tokens issued outside a session."""
    partner: str = ""
    """A partner identity (`game-server`, `node-agent`, ...): from a verified client certificate forwarded by
    the edge, or from a service-issued credential such as a node agent token. Empty for accounts."""
    service: str = ""
    """A FAR service identity (`inference`, ...) from the caller's own mTLS certificate. Empty otherwise."""

    @property
    def is_authenticated(self) -> bool:
        """A signed-in account: a wallet with a verified access token (its `jti` is the token id). A partner
        relaying an account's token is that account (and keeps `partner`); a partner or service identity alone,
        or a service's own credential (a node agent token), is not an account."""
        return bool(self.subject) and not self.service and (not self.partner or bool(self.token_id))

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def has_any_role(self, *roles: Role) -> bool:
        return any(role in self.roles for role in roles)


ANONYMOUS = Principal()


class BearerAuthenticator(Protocol):
    """A service's own bearer credential (e.g. gpu's node agent tokens), tried before the JWT verifier.

    `accepts` must be cheap and specific (a prefix check); `authenticate` returns the caller or raises
    Unauthenticated. Register one on `Runtime.authenticators` in the service's setup.
    """

    def accepts(self, token: str) -> bool: ...

    async def authenticate(self, token: str) -> Principal: ...


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
    """Verifies access tokens and turns their claims into a Principal.

    A token that verified is remembered (its exact text, signature included, up to `cache_size` of them), so
    the next call with it skips PyJWT's parse and HMAC (~135 us of a call's CPU, measured); a remembered token is
    still refused once it expires. Only the expiry can change a verified token's answer: the keys are fixed
    for the verifier's life, and `iat`/`nbf`, checked the first time, only get further behind. Revocation
    is not the verifier's: the revocation list is asked on every call whatever the cache says.
    """

    def __init__(
        self,
        keys: JwtKeys,
        *,
        leeway_s: float = 5.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._leeway = leeway_s
        self._cache_size = cache_size
        self._clock = clock
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at > self._clock() - self._leeway:
                return known
            del self._verified[token]
            raise Unauthenticated("the access token has expired", reason="TOKEN_EXPIRED")
        principal = self._verify(token)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:  # the oldest goes (insertion order)
                del self._verified[next(iter(self._verified))]
            self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
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
        session_id = claims.get("sid", "")
        if not isinstance(session_id, str):
            raise Unauthenticated("the access token's sid claim is malformed", reason="TOKEN_INVALID")
        return Principal(
            subject=str(claims["sub"]).lower(),
            roles=frozenset(roles),
            token_id=str(claims["jti"]),
            expires_at=float(claims["exp"]),
            session_id=session_id,
        )


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed access token with the claims its issuer keeps: `jti` (to revoke it) and `exp`."""

    token: str
    token_id: str
    expires_at: int


class TokenIssuer:
    """Signs access tokens with the current key (used by the auth service, and by tests)."""

    def __init__(self, keys: JwtKeys) -> None:
        self._keys = keys

    def issue(self, subject: str, roles: Iterable[str], *, ttl_s: float = 900.0) -> str:
        return self.issue_token(subject, roles, ttl_s=ttl_s).token

    def issue_token(
        self,
        subject: str,
        roles: Iterable[str],
        *,
        ttl_s: float = 900.0,
        session_id: str = "",
        now: float | None = None,
    ) -> IssuedToken:
        """A token for `subject` with `roles`, valid `ttl_s` from `now`; `session_id` goes in the `sid` claim."""
        issued_at = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self._keys.issuer,
            "aud": self._keys.audience,
            "sub": subject.lower(),
            "roles": sorted(set(roles)),
            "iat": issued_at,
            "exp": issued_at + int(ttl_s),
            "jti": uuid.uuid4().hex,
        }
        if session_id:
            claims["sid"] = session_id
        token = jwt.encode(
            claims,
            self._keys.secrets[self._keys.current_kid],
            algorithm="HS256",
            headers={"kid": self._keys.current_kid},
        )
        return IssuedToken(token=token, token_id=claims["jti"], expires_at=claims["exp"])


class RevocationList:
    """Access tokens refused before they expire: `<prefix>auth:revoked:<jti>` keys in Redis.

    The auth service adds the token ids of signed-out and revoked sessions; every server's auth
    interceptor checks the id of each token it accepts (one EXISTS per authenticated call). A key lives
    until its token would have expired anyway, so the list stays as small as the set of live tokens.
    """

    def __init__(self, redis: Redis, key_prefix: str, *, leeway_s: float = 5.0) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}auth:revoked:"
        self._leeway = leeway_s

    def key(self, token_id: str) -> str:
        return self._prefix + token_id

    async def is_revoked(self, token_id: str) -> bool:
        """Whether the token was revoked; UNAVAILABLE when Redis cannot answer (a revoked token must not pass)."""
        try:
            return bool(await self._redis.exists(self.key(token_id)))
        except Exception as exc:  # redis-py raises its own errors and OSError subclasses
            raise Unavailable(
                "cannot check whether the access token was revoked; retry", reason="REVOCATION_CHECK_UNAVAILABLE"
            ) from exc

    async def revoke(self, tokens: Iterable[tuple[str, float]], *, now: float | None = None) -> None:
        """Refuse each `(token_id, expires_at)` from now on; tokens that already expired are skipped."""
        current = time.time() if now is None else now
        async with self._redis.pipeline(transaction=False) as pipe:
            queued = False
            for token_id, expires_at in tokens:
                ttl = math.ceil(expires_at - current + self._leeway)
                if ttl > 0:
                    pipe.set(self.key(token_id), b"1", ex=ttl)
                    queued = True
            if queued:
                await pipe.execute()


def recover_wallet(message: str, signature: str) -> str:
    """The address (lower-case) that signed `message` with EIP-191 personal_sign."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        address: str = Account.recover_message(encode_defunct(text=message), signature=signature)
    except Exception as exc:  # eth_account raises several unrelated types for bad signatures
        raise Unauthenticated("the signature does not verify", reason="BAD_SIGNATURE") from exc
    return address.lower()
