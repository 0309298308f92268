"""The dev platform CA and the certificates it signs: who is who on the mTLS links.

Identities are SPIFFE ids under the trust domain `far.network`, carried as the certificate's URI SAN:
`spiffe://far.network/service/<name>` for each server, `spiffe://far.network/edge/envoy` for Envoy and
`spiffe://far.network/partner/<name>` for partner callers. Servers map them to principals
(servers/common/tls.py); Envoy checks them on both sides (devstack/envoy.py).

`DevPki.ensure(dir)` creates what is missing (EC P-256 keys, files 0600) and reuses what is there, so
`make run` makes the CA once (`.run/pki/`, never committed) and tests make theirs in temp dirs.
Production brings its own CA and certificates as files (GRPC_TLS_* for the servers, EDGE_TLS_* for Envoy).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "far.network"
EDGE = "envoy"
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=365)
# A leaf this close to its end is issued again at the next start.
RENEW_BEFORE = dt.timedelta(days=7)


def spiffe_id(kind: str, name: str) -> str:
    """`spiffe://far.network/<kind>/<name>`; kind is `service`, `edge` or `partner`."""
    return f"spiffe://{TRUST_DOMAIN}/{kind}/{name}"


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate and its private key on disk."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM)."""
        return self.cert.read_bytes(), self.key.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file readable by its owner only (created 0600, never briefly wider)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(files: CertFiles, common_name: str = "FAR dev platform CA") -> None:
    """A self-signed CA (path length 0: it signs leaves only) written to `files`."""
    key = _new_key()
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FAR"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))


def issue(
    ca: CertFiles,
    files: CertFiles,
    uri: str,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    lifetime: dt.timedelta = LEAF_LIFETIME,
) -> None:
    """A leaf for the SPIFFE id `uri`, signed by `ca`, good for TLS server and client use, written to `files`."""
    ca_pem, ca_key_pem = ca.read()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not an EC key")
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    sans += [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FAR"),
                    x509.NameAttribute(NameOID.COMMON_NAME, uri.rsplit("/", 2)[-1]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))


def _usable(ca_cert: x509.Certificate, files: CertFiles, uri: str) -> bool:
    """Whether the leaf at `files` exists, is signed by `ca_cert`, names `uri` and is not about to expire."""
    if not (files.cert.is_file() and files.key.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return uris == [uri] and cert.not_valid_after_utc - _now() > RENEW_BEFORE


@dataclass(frozen=True)
class DevPki:
    """A directory holding the CA (`ca.pem`, `ca.key`) and one `<kind>-<name>.pem` / `.key` per identity."""

    directory: Path

    @property
    def ca(self) -> CertFiles:
        return CertFiles(self.directory / "ca.pem", self.directory / "ca.key")

    @property
    def ca_file(self) -> Path:
        """The trust bundle every party verifies the others against."""
        return self.ca.cert

    def files(self, kind: str, name: str) -> CertFiles:
        return CertFiles(self.directory / f"{kind}-{name}.pem", self.directory / f"{kind}-{name}.key")

    def service(self, name: str) -> CertFiles:
        return self.files("service", name)

    def edge(self) -> CertFiles:
        return self.files("edge", EDGE)

    def partner(self, name: str) -> CertFiles:
        return self.files("partner", name)

    def ensure_identity(self, kind: str, name: str) -> CertFiles:
        """The certificate of `spiffe://far.network/<kind>/<name>`, issued now unless a usable one is on disk."""
        files = self.files(kind, name)
        uri = spiffe_id(kind, name)
        if not _usable(x509.load_pem_x509_certificate(self.ca.cert.read_bytes()), files, uri):
            issue(self.ca, files, uri)
        return files

    @classmethod
    def ensure(
        cls,
        directory: Path,
        *,
        services: Iterable[str] = (),
        partners: Iterable[str] = (),
    ) -> DevPki:
        """The PKI in `directory`: a CA (created when missing), the edge, each service and each partner.

        Existing files are reused; a leaf is issued again when it is missing, signed by another CA, names
        another identity or expires within a week. A new CA makes every leaf new.
        """
        pki = cls(Path(directory).resolve())
        pki.directory.mkdir(parents=True, exist_ok=True)
        pki.directory.chmod(0o700)
        if not (pki.ca.cert.is_file() and pki.ca.key.is_file()):
            create_ca(pki.ca)
        pki.ensure_identity("edge", EDGE)
        for name in services:
            pki.ensure_identity("service", name)
        for name in partners:
            pki.ensure_identity("partner", name)
        return pki
