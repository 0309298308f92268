"""mTLS for the servers: the credentials they bind with, and who a verified peer certificate says is calling.

With GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE and GRPC_TLS_CLIENT_CA_FILE (servers/common/config.py) a server
listens on TLS only and requires a client certificate signed by the platform CA. The certificate's SPIFFE
id (its one URI SAN, which gRPC reports as `peer_spiffe_id`, so no certificate is parsed per call) then
names the caller:

- `spiffe://far.network/service/<name>`: another FAR service (LEVEL_INTERNAL);
- `spiffe://far.network/edge/envoy`: the edge, trusted to forward who called it: the partner in
  `x-forwarded-client-cert` (set by Envoy's partner listener from the partner's verified certificate),
  or the account of the bearer token;
- anything else: refused (UNAUTHENTICATED, `PEER_NOT_ALLOWED`), whoever signed it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from servers.common.auth import Principal
from servers.common.errors import Unauthenticated

TRUST_DOMAIN = "far.network"
EDGE_ID = f"spiffe://{TRUST_DOMAIN}/edge/envoy"
XFCC_HEADER = "x-forwarded-client-cert"
_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


class TlsFilesError(ValueError):
    """A TLS file is missing, unreadable or not what it should be; the message names the file."""


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key, and the CA its clients' certificates must chain to."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, client_ca_file: Path) -> ServerTls:
        """Read and check the three PEM files: the key must belong to the certificate."""
        chain, key, ca = (_read(p) for p in (cert_file, key_file, client_ca_file))
        try:
            certs = x509.load_pem_x509_certificates(chain)
        except ValueError:
            raise TlsFilesError(f"{cert_file}: no PEM certificate") from None
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsFilesError(f"{client_ca_file}: no PEM CA certificate") from None
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise TlsFilesError(f"{key_file}: not an unencrypted PEM private key") from None
        if _spki(private.public_key()) != _spki(certs[0].public_key()):
            raise TlsFilesError(f"{key_file} is not the key of the certificate in {cert_file}")
        return cls(chain, key, ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with a required client certificate that chains to `client_ca`."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca, require_client_auth=True
        )


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFilesError(f"{path}: {exc.strerror or exc}") from None


class PeerKind(Enum):
    SERVICE = "service"
    EDGE = "edge"


@dataclass(frozen=True, slots=True)
class Peer:
    """The mTLS peer of a call: a FAR service (`name`) or the edge."""

    kind: PeerKind
    spiffe_id: str
    name: str = ""


def peer_of(spiffe_id: str) -> Peer:
    """The peer a verified SPIFFE id names; UNAUTHENTICATED (`PEER_NOT_ALLOWED`) for any other identity."""
    if spiffe_id == EDGE_ID:
        return Peer(PeerKind.EDGE, spiffe_id)
    kind, _, name = spiffe_id.removeprefix(_PREFIX).partition("/")
    if spiffe_id.startswith(_PREFIX) and kind == "service" and _is_name(name):
        return Peer(PeerKind.SERVICE, spiffe_id, name)
    raise Unauthenticated(
        f"the client certificate's identity {spiffe_id or '(none)'} may not call services directly",
        reason="PEER_NOT_ALLOWED",
    )


def _is_name(name: str) -> bool:
    return bool(name) and name.replace("-", "").isalnum() and name.islower() and name[0].isalpha()


def peer_spiffe_id(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """The SPIFFE id gRPC verified in the peer's certificate (empty if it carries none, or several URIs)."""
    return next(iter(auth_context.get("peer_spiffe_id", ())), b"").decode()


@functools.lru_cache(maxsize=256)
def xfcc_partner(header: str | None) -> Principal | None:
    """The partner in Envoy's `x-forwarded-client-cert` (`By=...;Hash=...;URI=spiffe://far.network/partner/x`).

    None without the header. Envoy's partner listener replaces the header (SANITIZE_SET) with exactly one
    element for the verified client certificate, so anything else (several elements, no URI, a URI that is
    not a partner's SPIFFE id) is refused: UNAUTHENTICATED, `PEER_NOT_ALLOWED`. A partner's connection sends
    the same header on every call, so answers are cached (a parse costs ~10 us, a cache hit well under 1).
    """
    if header is None:
        return None
    fields = _xfcc_fields(header)
    uri = fields.get("URI", "") if fields is not None else ""
    kind, _, name = uri.removeprefix(_PREFIX).partition("/")
    if not uri.startswith(_PREFIX) or kind != "partner" or not _is_name(name):
        raise Unauthenticated(
            "the forwarded client certificate does not name a partner identity", reason="PEER_NOT_ALLOWED"
        )
    return Principal(subject=uri, partner=name)


def _xfcc_fields(header: str) -> dict[str, str] | None:
    """`key=value;key="quoted value"` of a one-element XFCC header; None when it has several elements."""
    fields: dict[str, str] = {}
    key, value, quoted, in_value = "", "", False, False
    for char in header + ";":
        if quoted:
            if char == '"':
                quoted = False
            else:
                value += char
        elif char == '"' and in_value:
            quoted = True
        elif char == "=" and not in_value:
            in_value = True
        elif char == ";":
            if key.strip():
                fields[key.strip()] = value.strip()
            key, value, in_value = "", "", False
        elif char == ",":
            return None
        elif in_value:
            value += char
        else:
            key += char
    return fields
