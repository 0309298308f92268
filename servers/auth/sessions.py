"""Sign-in and sessions: EIP-4361 challenges, the checks a signed message must pass, token issue,
rotation with reuse detection, sign-out and revocation.

Transport-agnostic, like accounts.py. Messages are checked in this order, each failure with its own
reason: shape (INVALID_ARGUMENT), the message's domain, URI and chain against the configuration, its
validity period, then the nonce (consumed here, once), the text against the issued one, the signature.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from eth_utils.address import is_checksum_address, to_checksum_address

from servers.auth import repository as repo
from servers.auth import siwe
from servers.auth.accounts import Accounts, account_not_found, check_visible, parse_account, role_claims
from servers.auth.challenges import Challenge, ChallengeStore
from servers.auth.models import AccountRow, RefreshTokenRow, SessionRow
from servers.auth.settings import DOMAIN, AuthSettings
from servers.common.auth import IssuedToken, Principal, RevocationList, TokenIssuer, recover_wallet, require_signed_in
from servers.common.db import UnitOfWork
from servers.common.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from servers.common.pagination import PageTokens, page_size
from servers.common.validation import Violations

Clock = Callable[[], datetime]

SESSION_NAME = re.compile(r"^accounts/(?P<account>me|0x[0-9a-fA-F]{40})/sessions/(?P<session>[a-z][a-z0-9]{0,62})\Z")
SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}\Z")
REFRESH_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}\Z")
ANY_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
MAX_MESSAGE_CHARS = 4096
MAX_URI_CHARS = 2048
MAX_USER_AGENT_CHARS = 256
# How far a message's Issued At may be ahead of this server's clock (the wallet's clock does not matter:
# the service wrote the time itself, but replicas' clocks differ a little).
CLOCK_SKEW = timedelta(seconds=30)
_NONCE_ALPHABET = string.ascii_letters + string.digits

REVOKED_BY_SIGN_OUT = "signed_out"
REVOKED_BY_REQUEST = "revoked"
REVOKED_BY_REUSE = "refresh_token_reused"


def system_clock() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_session_id() -> str:
    return "s" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _new_nonce() -> str:
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(16))


def _unauthenticated(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


@dataclass(frozen=True)
class IssuedSession:
    """A session with the tokens just issued for it (the only time the refresh token exists in clear)."""

    session: SessionRow
    account: AccountRow
    access: IssuedToken
    refresh_token: str


@dataclass(frozen=True)
class Refreshed:
    """What RefreshSession ends with: new tokens, or an error raised only after the revocation it caused commits."""

    issued: IssuedSession | None = None
    error: DomainError | None = None

    def unwrap(self) -> IssuedSession:
        if self.error is not None:
            raise self.error
        assert self.issued is not None
        return self.issued


class Sessions:
    """The sign-in and session operations. Those that touch PostgreSQL take the RPC's unit of work."""

    def __init__(
        self,
        settings: AuthSettings,
        challenges: ChallengeStore,
        issuer: TokenIssuer,
        revocations: RevocationList,
        accounts: Accounts,
        page_tokens: PageTokens,
        clock: Clock = system_clock,
    ) -> None:
        self._settings = settings
        self._challenges = challenges
        self._issuer = issuer
        self._revocations = revocations
        self._accounts = accounts
        self._tokens = page_tokens
        self._clock = clock

    # Challenges

    async def create_challenge(self, wallet_address: str, chain_id: int, domain: str, uri: str) -> Challenge:
        v = Violations()
        if v.require(wallet_address, "wallet_address") and not _valid_address(wallet_address):
            v.add("wallet_address", "must be 0x and 40 hex characters, with a valid EIP-55 checksum if mixed-case")
        v.require(chain_id, "chain_id")
        domain_ok = v.require(domain, "domain") and bool(DOMAIN.match(domain.lower()))
        if domain and not domain_ok:
            v.add("domain", "must be an RFC 3986 authority: a host name, and a port when not the default")
        if v.require(uri, "uri"):
            problem = _uri_problem(uri, domain if domain_ok else None)
            if problem:
                v.add("uri", problem)
        v.raise_if_any()
        if domain.lower() not in self._settings.domains:
            raise InvalidArgument(
                f"{domain} is not a sign-in domain of this platform",
                violations=[FieldViolation("domain", "is not a configured sign-in domain")],
                reason="DOMAIN_NOT_ALLOWED",
            )
        if chain_id not in self._settings.chain_ids:
            supported = ", ".join(str(c) for c in sorted(self._settings.chain_ids))
            raise InvalidArgument(
                f"chain {chain_id} is not supported (supported: {supported})",
                violations=[FieldViolation("chain_id", f"must be one of {supported}")],
                reason="CHAIN_NOT_SUPPORTED",
            )
        wallet = wallet_address.lower()
        now = self._clock().replace(microsecond=0)
        retry_after = await self._challenges.count_issue(wallet, now=now, limit=self._settings.challenges_per_minute)
        if retry_after is not None:
            raise ResourceExhausted(
                "too many sign-in challenges for this wallet; retry later",
                retry_after_s=retry_after,
                reason="RATE_LIMITED",
            )
        expire = now + timedelta(seconds=self._settings.nonce_ttl_s)
        nonce = _new_nonce()
        message = siwe.format_message(
            siwe.SiweMessage(
                domain=domain.lower(),
                address=to_checksum_address(wallet),
                statement=siwe.STATEMENT,
                uri=uri,
                version="1",
                chain_id=chain_id,
                nonce=nonce,
                issued_at=now,
                expiration_time=expire,
            )
        )
        challenge = Challenge(
            nonce=nonce,
            wallet=wallet,
            domain=domain.lower(),
            uri=uri,
            chain_id=chain_id,
            message=message,
            issue_time=now,
            expire_time=expire,
        )
        if not await self._challenges.put(challenge, now=self._clock()):
            raise Unavailable("could not store the challenge; retry", reason="CHALLENGE_COLLISION")
        return challenge

    # Sign-in

    def _check_message(self, message: siwe.SiweMessage, now: datetime) -> None:
        if message.domain.lower() not in self._settings.domains:
            raise _unauthenticated(f"the message is for {message.domain}, not a sign-in domain", "DOMAIN_MISMATCH")
        if _uri_problem(message.uri, message.domain):
            raise _unauthenticated("the message's URI is not on the message's domain", "URI_MISMATCH")
        if message.chain_id not in self._settings.chain_ids:
            raise _unauthenticated(f"the message is for chain {message.chain_id}, not supported", "CHAIN_MISMATCH")
        if message.expiration_time is not None and message.expiration_time <= now:
            raise _unauthenticated("the message has expired; ask for a new challenge", "MESSAGE_EXPIRED")
        if message.issued_at > now + CLOCK_SKEW or (message.not_before is not None and message.not_before > now):
            raise _unauthenticated("the message is not valid yet", "MESSAGE_NOT_YET_VALID")

    async def sign_in(self, uow: UnitOfWork, message: str, signature: str, user_agent: str) -> IssuedSession:
        v = Violations()
        if v.require(message, "message") and len(message) > MAX_MESSAGE_CHARS:
            v.add("message", f"must be at most {MAX_MESSAGE_CHARS} characters")
        if v.require(signature, "signature") and not SIGNATURE.match(signature):
            v.add("signature", "must be 0x and 130 hex characters (65 bytes: r, s, v)")
        v.raise_if_any()
        try:
            parsed = siwe.parse_message(message)
        except siwe.MessageSyntaxError as exc:
            raise InvalidArgument.field("message", f"is not an EIP-4361 message: {exc}") from None
        now = self._clock()
        self._check_message(parsed, now)
        challenge = await self._challenges.take(parsed.nonce)
        if challenge is None:
            raise _unauthenticated("no challenge with this nonce: unknown, used or expired", "CHALLENGE_NOT_FOUND")
        if parsed.domain.lower() != challenge.domain:
            raise _unauthenticated(f"the challenge was issued for {challenge.domain}", "DOMAIN_MISMATCH")
        if parsed.uri != challenge.uri:
            raise _unauthenticated(f"the challenge was issued for {challenge.uri}", "URI_MISMATCH")
        if parsed.chain_id != challenge.chain_id:
            raise _unauthenticated(f"the challenge was issued for chain {challenge.chain_id}", "CHAIN_MISMATCH")
        if message != challenge.message:
            raise _unauthenticated("the message differs from the one issued with this nonce", "MESSAGE_MISMATCH")
        try:
            signer = recover_wallet(message, signature)
        except Unauthenticated:
            signer = ""
        if signer != challenge.wallet:
            raise _unauthenticated("the signature is not the message's wallet's", "INVALID_SIGNATURE")

        account = await self._accounts.signed_in(uow, challenge.wallet, now)
        session = SessionRow(
            id=_new_session_id(),
            wallet=account.wallet,
            user_agent=user_agent[:MAX_USER_AGENT_CHARS],
            create_time=now,
            refresh_time=now,
            refresh_expire_time=now + timedelta(seconds=self._settings.refresh_ttl_s),
        )
        await repo.insert_session(uow.session, session)
        return await self._issue(uow, session, account, now)

    async def _issue(self, uow: UnitOfWork, session: SessionRow, account: AccountRow, now: datetime) -> IssuedSession:
        access = self._issuer.issue_token(
            account.wallet,
            role_claims(account),
            ttl_s=self._settings.access_ttl_s,
            session_id=session.id,
            now=now.timestamp(),
        )
        refresh_token = secrets.token_urlsafe(32)
        await repo.insert_refresh_token(
            uow.session,
            RefreshTokenRow(
                token_hash=hash_token(refresh_token),
                session_id=session.id,
                issue_time=now,
                expire_time=session.refresh_expire_time,
                access_token_id=access.token_id,
                access_expire_time=datetime.fromtimestamp(access.expires_at, UTC),
            ),
        )
        return IssuedSession(session=session, account=account, access=access, refresh_token=refresh_token)

    # Refresh, sign-out, revocation

    async def refresh(self, uow: UnitOfWork, refresh_token: str) -> Refreshed:
        if not refresh_token:
            raise InvalidArgument.field("refresh_token", "is required")
        if not REFRESH_TOKEN.match(refresh_token):
            raise _unauthenticated("the refresh token is malformed", "REFRESH_TOKEN_INVALID")
        token_hash = hash_token(refresh_token)
        # Lock the token, then its session: of two refreshes racing with one token, the second sees the
        # first's rotation once it gets the lock, and takes it for reuse.
        token = await repo.get_refresh_token(uow.session, token_hash, for_update=True)
        if token is None:
            raise _unauthenticated("unknown refresh token", "REFRESH_TOKEN_INVALID")
        session = await repo.get_session(uow.session, token.session_id, for_update=True)
        assert session is not None
        now = self._clock()
        if session.revoke_time is not None:
            raise _unauthenticated("the session was signed out or revoked", "SESSION_REVOKED")
        if token.rotate_time is not None:
            await self._revoke(uow, session, now, REVOKED_BY_REUSE)
            return Refreshed(
                error=_unauthenticated(
                    "this refresh token was already used: the session is revoked; sign in again",
                    "REFRESH_TOKEN_REUSED",
                )
            )
        if token.expire_time <= now:
            raise _unauthenticated("the refresh token has expired; sign in again", "REFRESH_TOKEN_EXPIRED")
        account = await repo.get_account(uow.session, session.wallet)
        assert account is not None
        await repo.mark_rotated(uow.session, token_hash, now)
        await repo.delete_expired_refresh_tokens(uow.session, session.id, now)
        refresh_expire_time = now + timedelta(seconds=self._settings.refresh_ttl_s)
        await repo.rotate_session(uow.session, session.id, now=now, refresh_expire_time=refresh_expire_time)
        session.refresh_time, session.refresh_expire_time = now, refresh_expire_time
        return Refreshed(issued=await self._issue(uow, session, account, now))

    async def _revoke(self, uow: UnitOfWork, session: SessionRow, now: datetime, reason: str) -> None:
        """Revoke the session and put its live access tokens on the revocation list (before the commit:
        if Redis fails, the RPC fails and nothing is revoked, rather than a revocation that does not bite)."""
        if await repo.revoke_session(uow.session, session.id, now=now, reason=reason):
            live = await repo.live_access_tokens(uow.session, session.id, now)
            await self._revocations.revoke(
                [(token_id, expires.timestamp()) for token_id, expires in live], now=now.timestamp()
            )

    async def sign_out(self, uow: UnitOfWork, principal: Principal, refresh_token: str) -> None:
        now = self._clock()
        if refresh_token:
            # Whatever the token, signing out succeeds: the client can always clear its state.
            token = (
                await repo.get_refresh_token(uow.session, hash_token(refresh_token))
                if REFRESH_TOKEN.match(refresh_token)
                else None
            )
            session = await repo.get_session(uow.session, token.session_id, for_update=True) if token else None
            if session is not None:
                await self._revoke(uow, session, now, REVOKED_BY_SIGN_OUT)
            return
        if not principal.is_authenticated:
            raise Unauthenticated("send the session's refresh token, or sign out with its access token")
        if principal.session_id:
            session = await repo.get_session(uow.session, principal.session_id, for_update=True)
            if session is not None and session.wallet == principal.subject:
                await self._revoke(uow, session, now, REVOKED_BY_SIGN_OUT)
        await self._revocations.revoke([(principal.token_id, principal.expires_at)], now=now.timestamp())

    async def list_sessions(
        self, uow: UnitOfWork, principal: Principal, parent: str, size: int, token: str
    ) -> tuple[list[SessionRow], str]:
        require_signed_in(principal)
        limit = page_size(size)
        wallet = parse_account(parent, principal, field="parent")
        check_visible(wallet, principal)
        if await repo.get_account(uow.session, wallet) is None:
            raise account_not_found(wallet)
        scope = self._tokens.scope("sessions", wallet)
        cursor = self._tokens.decode(token, scope=scope)
        after = (datetime.fromisoformat(cursor["t"]), str(cursor["id"])) if cursor else None
        rows = await repo.list_live_sessions(uow.session, wallet, now=self._clock(), after=after, limit=limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = self._tokens.encode({"t": rows[-1].create_time.isoformat(), "id": rows[-1].id}, scope=scope)
        return rows, next_token

    async def revoke_session(self, uow: UnitOfWork, principal: Principal, name: str) -> None:
        require_signed_in(principal)
        match = SESSION_NAME.match(name)
        if match is None:
            description = "is required" if not name else "must be accounts/{wallet address}/sessions/{session}"
            raise InvalidArgument.field("name", description)
        wallet = parse_account(f"accounts/{match.group('account')}", principal)
        session = await repo.get_session(uow.session, match.group("session"), for_update=True)
        if session is None or session.wallet != wallet or not (principal.is_admin or wallet == principal.subject):
            resource = f"accounts/{wallet}/sessions/{match.group('session')}"
            raise NotFound(f"{resource} does not exist", reason="SESSION_NOT_FOUND", metadata={"resource": resource})
        await self._revoke(uow, session, self._clock(), REVOKED_BY_REQUEST)


def _valid_address(value: str) -> bool:
    if not ANY_ADDRESS.match(value):
        return False
    body = value[2:]
    if body.islower() or body.isupper() or body.isdigit():
        return True
    return bool(is_checksum_address(value))


def _uri_problem(uri: str, domain: str | None) -> str | None:
    """Why `uri` cannot be a sign-in URI for `domain` (None when it can; any authority when `domain` is None)."""
    if len(uri) > MAX_URI_CHARS:
        return f"must be at most {MAX_URI_CHARS} characters"
    if not re.fullmatch(r"[\x21-\x7e]+", uri):
        return "must be printable ASCII without spaces"
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return "must be an absolute http(s) URI"
    if domain is not None and parts.netloc.lower() != domain.lower():
        return "must be on `domain` (its authority must be the domain)"
    return None
