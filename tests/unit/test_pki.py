"""devstack.pki: the dev CA and the SPIFFE-named certificates it signs, made once and reused."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from devstack.pki import CertFiles, DevPki, issue, spiffe_id


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def uris(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


def snapshot(pki: DevPki) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pki.directory.iterdir())}


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return DevPki.ensure(tmp_path / "pki", services=["gamed", "auth"], partners=["game-server"])


class TestSpiffeIds:
    def test_trust_domain_and_kinds(self) -> None:
        assert spiffe_id("service", "gamed") == "spiffe://far.network/service/gamed"
        assert spiffe_id("edge", "envoy") == "spiffe://far.network/edge/envoy"
        assert spiffe_id("partner", "game-server") == "spiffe://far.network/partner/game-server"


class TestEnsure:
    def test_files_and_permissions(self, pki: DevPki) -> None:
        names = {p.name for p in pki.directory.iterdir()}
        stems = ["ca", "edge-envoy", "service-gamed", "service-auth", "partner-game-server"]
        assert names == {f"{stem}.{ext}" for stem in stems for ext in ("pem", "key")}
        assert pki.directory.stat().st_mode & 0o777 == 0o700
        for key in pki.directory.glob("*.key"):
            assert key.stat().st_mode & 0o777 == 0o600, key

    def test_ca_signs_leaves_only(self, pki: DevPki) -> None:
        ca = load(pki.ca_file)
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is True
        assert constraints.path_length == 0
        assert ca.subject == ca.issuer

    @pytest.mark.parametrize(
        ("kind", "name"), [("service", "gamed"), ("service", "auth"), ("edge", "envoy"), ("partner", "game-server")]
    )
    def test_leaf_names_its_spiffe_id_and_chains_to_the_ca(self, pki: DevPki, kind: str, name: str) -> None:
        cert = load(pki.files(kind, name).cert)
        cert.verify_directly_issued_by(load(pki.ca_file))
        assert uris(cert) == [spiffe_id(kind, name)]
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    def test_second_start_reuses_everything(self, pki: DevPki) -> None:
        before = snapshot(pki)
        again = DevPki.ensure(pki.directory, services=["gamed", "auth"], partners=["game-server"])
        assert snapshot(again) == before

    def test_a_new_service_gets_a_certificate_the_rest_stays(self, pki: DevPki) -> None:
        before = snapshot(pki)
        DevPki.ensure(pki.directory, services=["gamed", "auth", "gaming"], partners=["game-server"])
        after = snapshot(pki)
        assert {k: v for k, v in after.items() if k in before} == before
        assert uris(load(pki.service("gaming").cert)) == ["spiffe://far.network/service/gaming"]

    def test_a_new_ca_reissues_every_leaf(self, pki: DevPki) -> None:
        old_leaf = pki.service("gamed").cert.read_bytes()
        pki.ca.cert.unlink()
        DevPki.ensure(pki.directory, services=["gamed"])
        assert pki.service("gamed").cert.read_bytes() != old_leaf
        load(pki.service("gamed").cert).verify_directly_issued_by(load(pki.ca_file))

    def test_leaf_from_another_ca_or_for_another_identity_is_replaced(self, pki: DevPki, tmp_path: Path) -> None:
        other = DevPki.ensure(tmp_path / "other", services=["gamed"])
        for path in (pki.service("gamed").cert, pki.service("gamed").key):
            path.write_bytes((other.directory / path.name).read_bytes())
        pki.edge().cert.write_bytes(pki.service("auth").cert.read_bytes())
        DevPki.ensure(pki.directory, services=["gamed"])
        load(pki.service("gamed").cert).verify_directly_issued_by(load(pki.ca_file))
        assert uris(load(pki.edge().cert)) == ["spiffe://far.network/edge/envoy"]

    def test_leaf_about_to_expire_is_renewed(self, pki: DevPki) -> None:
        files = pki.service("gamed")
        issue(pki.ca, files, spiffe_id("service", "gamed"), lifetime=dt.timedelta(days=1))
        DevPki.ensure(pki.directory, services=["gamed"])
        remaining = load(files.cert).not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert remaining > dt.timedelta(days=300)

    def test_ensure_identity_issues_on_demand(self, pki: DevPki) -> None:
        files = pki.ensure_identity("partner", "node-agent")
        assert files == CertFiles(pki.directory / "partner-node-agent.pem", pki.directory / "partner-node-agent.key")
        assert uris(load(files.cert)) == ["spiffe://far.network/partner/node-agent"]
