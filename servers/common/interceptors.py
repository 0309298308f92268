"""Server interceptors, outermost first: request id -> observability -> auth -> access -> error mapping.

Observability sits outside auth and access so that rejected calls are counted and logged too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc
import structlog
from grpc_status import rpc_status
from opentelemetry import propagate, trace

from servers.common.access import UNDECLARED, AccessRule
from servers.common.auth import BearerAuthenticator, Principal, RevocationList, TokenVerifier
from servers.common.context import call_started_var, principal_var, request_id_var
from servers.common.errors import DomainError, InvalidArgument, Unauthenticated, to_rpc_status
from servers.common.errors import internal_status as _internal_status
from servers.common.observability import RPC_HANDLED, RPC_LATENCY
from servers.common.tls import XFCC_HEADER, PeerKind, peer_of, peer_spiffe_id, xfcc_partner

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
UnaryAround = Callable[[UnaryBehavior, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamAround = Callable[[StreamBehavior, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]

_UNOBSERVED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
log = structlog.get_logger("far.rpc")


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


def _bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The token of `authorization: Bearer <token>`; None without the header, TOKEN_INVALID when malformed."""
    header = _metadata(context, "authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer <token>'", reason="TOKEN_INVALID")
    return token.strip()


async def abort_with_error(context: grpc.aio.ServicerContext[Any, Any], error: DomainError, domain: str) -> None:
    """End the RPC with the google.rpc.Status of a domain error (raises grpc.aio.AbortError)."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error, domain)))


def wrap_handler(
    handler: Any, around_unary: UnaryAround, around_stream: StreamAround, *, raw_requests: bool = False
) -> Any:
    """The handler with its behavior called through `around_unary` or `around_stream`, whatever its kind.
    `raw_requests`: gRPC hands the wrappers the request bytes, which they decode themselves."""
    kwargs = {
        "request_deserializer": None if raw_requests else handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc.aio tells coroutines and async generators apart by inspecting the function, so the
    # wrappers must be real `async def` functions, not lambdas returning coroutines.
    unary_inner: UnaryBehavior | None = handler.unary_unary or handler.stream_unary
    if unary_inner is not None:
        inner_unary = unary_inner

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await around_unary(inner_unary, request, context)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)

    inner_stream: StreamBehavior = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for response in around_stream(inner_stream, request, context):
            yield response

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Base for interceptors that run code around every call: override `unary` and `stream`."""

    def skip(self, method: str) -> bool:
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or self.skip(details.method):
            return handler
        method = details.method
        return wrap_handler(
            handler,
            lambda behavior, request, context: self.unary(method, behavior, request, context),
            lambda behavior, request, context: self.stream(method, behavior, request, context),
        )

    async def unary(
        self, method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return await behavior(request, context)

    async def stream(
        self, method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for response in behavior(request, context):
            yield response


class RequestIdInterceptor(AroundInterceptor):
    """Takes `x-request-id` from the caller (Envoy sets one) or makes one, for logs and error details; notes when
    the call arrived (the first interceptor) for latency figures that include the interceptors."""

    def _bind(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        call_started_var.set(time.monotonic())
        request_id_var.set(_metadata(context, "x-request-id") or uuid.uuid4().hex)

    async def unary(
        self, method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        self._bind(context)
        return await behavior(request, context)

    async def stream(
        self, method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        self._bind(context)
        async for response in behavior(request, context):
            yield response


class ObservabilityInterceptor(AroundInterceptor):
    """Prometheus counters and latency, one log line per failed call, and a server span when tracing is on."""

    def __init__(self, *, tracing: bool) -> None:
        self._tracer = trace.get_tracer("far.grpc") if tracing else None

    def skip(self, method: str) -> bool:
        return method.startswith(_UNOBSERVED_PREFIXES)

    def _finish(self, method: str, started: float, context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> None:
        service, _, name = method[1:].rpartition("/")
        code = context.code() if failed else None
        code_name = "OK" if code is None else code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        if failed and code_name == "OK":
            code_name = "CANCELLED"
        elapsed = time.perf_counter() - started
        RPC_HANDLED.labels(service, name, code_name).inc()
        RPC_LATENCY.labels(service, name).observe(elapsed)
        if code_name != "OK":
            log.info("rpc failed", method=method, code=code_name, duration_ms=round(elapsed * 1000, 2))

    def _span(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        assert self._tracer is not None
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self._tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER
        )

    async def unary(
        self, method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        started = time.perf_counter()
        failed = True
        try:
            if self._tracer is None:
                response = await behavior(request, context)
            else:
                with self._span(method, context):
                    response = await behavior(request, context)
            failed = False
            return response
        finally:
            self._finish(method, started, context, failed)

    async def stream(
        self, method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        failed = True
        try:
            if self._tracer is None:
                async for response in behavior(request, context):
                    yield response
            else:
                with self._span(method, context):
                    async for response in behavior(request, context):
                        yield response
            failed = False
        finally:
            self._finish(method, started, context, failed)


class AuthInterceptor(AroundInterceptor):
    """Finds out who is calling and puts the caller in a contextvar.

    Without mTLS: `authorization: Bearer <jwt>` when present, else ANONYMOUS. With mTLS (`mtls=True`, the
    server requires client certificates) the peer certificate's SPIFFE id comes first, on every call,
    health and reflection included (servers/common/tls.py): another FAR service is that service unless it
    passes an account's bearer token along; the edge forwards a partner (`x-forwarded-client-cert`) or an
    account's token; any other identity is UNAUTHENTICATED (`PEER_NOT_ALLOWED`). The forwarded-certificate
    header counts from the edge only and is ignored on plaintext servers, where anyone could send it.

    The AccessInterceptor then applies the method's declaration. A bad or expired token is UNAUTHENTICATED
    before the service sees the call, and so is a token on the revocation list (signed out or revoked:
    reason TOKEN_REVOKED) when the server has Redis.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        domain: str,
        revocations: RevocationList | None = None,
        authenticators: Sequence[BearerAuthenticator] = (),
        *,
        mtls: bool = False,
    ) -> None:
        self._verifier = verifier
        self._domain = domain
        self._revocations = revocations
        # The service's own bearer credentials (read at each call: setup may add some after construction).
        self._authenticators = authenticators
        self._mtls = mtls

    def skip(self, method: str) -> bool:
        return not self._mtls and method.startswith(_UNOBSERVED_PREFIXES)

    async def _authenticate(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            peer = peer_of(peer_spiffe_id(context.auth_context())) if self._mtls else None
            if method.startswith(_UNOBSERVED_PREFIXES):
                return
            token = _bearer_token(context)
            partner = xfcc_partner(_metadata(context, XFCC_HEADER)) if peer and peer.kind is PeerKind.EDGE else None
            if partner is not None:
                principal: Principal | None = await self._partner(partner, token)
            else:
                principal = await self._bearer(token) if token is not None else None
            if principal is None and peer is not None and peer.kind is PeerKind.SERVICE:
                principal = Principal(subject=peer.spiffe_id, service=peer.name)
            if principal is not None:
                principal_var.set(principal)
        except DomainError as error:
            await abort_with_error(context, error, self._domain)

    async def _partner(self, partner: Principal, token: str | None) -> Principal:
        """The partner whose certificate the edge verified. A service credential of the same partner kind that
        comes with it (a node agent's token names the node) is the more specific caller; an account's access
        token makes the call the account's, relayed by the partner (the principal keeps `partner`, so the
        partner's own methods stay open to it)."""
        if token is None:
            return partner
        for authenticator in self._authenticators:
            if authenticator.accepts(token):
                specific = await authenticator.authenticate(token)
                if specific.partner != partner.partner:
                    raise Unauthenticated(
                        f"the bearer credential is not a {partner.partner} credential", reason="PEER_NOT_ALLOWED"
                    )
                return specific
        account = await self._bearer(token)
        return replace(account, partner=partner.partner)

    async def _bearer(self, token: str) -> Principal:
        for authenticator in self._authenticators:
            if authenticator.accepts(token):
                return await authenticator.authenticate(token)
        principal = self._verifier.verify(token)
        if self._revocations is not None and await self._revocations.is_revoked(principal.token_id):
            raise Unauthenticated("the access token was revoked (signed out)", reason="TOKEN_REVOKED")
        return principal

    async def unary(
        self, method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._authenticate(method, context)
        return await behavior(request, context)

    async def stream(
        self, method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self._authenticate(method, context)
        async for response in behavior(request, context):
            yield response


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Enforces each method's `(far.api.v1.access)` declaration, after auth has set the caller.

    `rules` (`servers.common.access.access_rules`, built once at server start) maps each method path to
    its rule; a call costs one dictionary lookup, and PUBLIC methods are not even wrapped. A method
    missing from `rules` is refused (PERMISSION_DENIED, `ACCESS_NOT_DECLARED`); health and reflection pass.
    """

    def __init__(self, rules: Mapping[str, AccessRule], domain: str) -> None:
        self._guards = {method: self._guard(rule) for method, rule in rules.items()}
        self._undeclared = self._guard(UNDECLARED)
        self._domain = domain

    def _guard(self, rule: AccessRule) -> tuple[UnaryAround, StreamAround] | None:
        if rule.is_public:
            return None
        check = rule.check

        async def enforce(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                check(principal_var.get())
            except DomainError as error:
                await abort_with_error(context, error, self._domain)

        async def around_unary(
            behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            await enforce(context)
            return await behavior(request, context)

        async def around_stream(
            behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await enforce(context)
            async for response in behavior(request, context):
                yield response

        return around_unary, around_stream

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNOBSERVED_PREFIXES):
            return handler
        guard = self._guards.get(details.method, self._undeclared)
        if guard is None:
            return handler
        return wrap_handler(handler, *guard)


def _decoding(handler: Any) -> Any:
    """The handler taking request bytes and decoding them itself, so that a message that is not valid protobuf
    (Envoy's transcoder sends one for a JSON object where a map wants a string) is INVALID_ARGUMENT
    `MALFORMED_REQUEST` with the service's ErrorInfo, not grpcio's UNKNOWN (HTTP 500 through Envoy)."""
    deserialize: Callable[[bytes], Any] = handler.request_deserializer

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:
            raise InvalidArgument(
                "the request message could not be decoded; check its fields' types", reason="MALFORMED_REQUEST"
            ) from None

    async def decoded(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield decode(raw)

    # A request stream is decoded message by message, as the servicer reads it.
    decode_request: Callable[[Any], Any] = decoded if handler.request_streaming else decode

    def around(behavior: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return behavior(decode_request(request), context)

    return wrap_handler(handler, around, around, raw_requests=True)


class ErrorInterceptor(AroundInterceptor):
    """Turns domain errors into google.rpc.Status; anything unexpected into INTERNAL without internals.
    It also decodes the request (`_decoding`), so that an undecodable message is one of those errors."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        async def decoding(call: grpc.HandlerCallDetails) -> Any:
            handler = await continuation(call)
            if handler is None or handler.request_deserializer is None:
                return handler
            return _decoding(handler)

        return await super().intercept_service(decoding, details)

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], error: Exception, method: str) -> None:
        if isinstance(error, DomainError):
            await abort_with_error(context, error, self._domain)
        log.exception("unhandled error", method=method)
        status = _internal_status(self._domain, request_id_var.get())
        await context.abort_with_status(rpc_status.to_status(status))

    async def unary(
        self, method: str, behavior: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await self._fail(context, error, method)

    async def stream(
        self, method: str, behavior: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await self._fail(context, error, method)
