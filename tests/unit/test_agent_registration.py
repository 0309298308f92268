"""gpu.agent.registration: the RegisterNode message is exactly the contract's text and recovers to the operator."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from eth_account import Account
from far.gpu.v1 import node_pb2

from gpu.agent.registration import RegistrationClaim, new_claim, register_request, sign
from servers.common.auth import recover_wallet
from servers.gpu.registration import RegistrationProof, registration_message

# anvil's public dev account 1: never holds anything of value.
KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
ADDRESS = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"
NOW = datetime(2026, 11, 25, 10, 0, 0, 987654, tzinfo=UTC)


def claim() -> RegistrationClaim:
    return new_claim("gpu-node-1", "10.0.0.5:8001", KEY, 97, now=NOW)


class TestMessage:
    def test_is_the_contract_text_line_for_line(self) -> None:
        c = claim()
        assert c.message() == (
            "far.network GPU node registration\n"
            "Node: nodes/gpu-node-1\n"
            "Endpoint: 10.0.0.5:8001\n"
            f"Operator: {ADDRESS}\n"
            "Chain ID: 97\n"
            f"Nonce: {c.nonce}\n"
            "Issued At: 2026-11-25T10:00:00Z\n"
            "Expiration Time: 2026-11-25T10:05:00Z"
        )

    def test_times_are_whole_seconds_in_utc_even_from_another_zone(self) -> None:
        local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
        c = new_claim("n", "h:1", KEY, 97, now=local)
        assert "Issued At: 2026-11-25T10:00:00Z" in c.message()
        assert c.issue_time.microsecond == 0

    def test_nonce_is_fresh_letters_and_digits(self) -> None:
        first, second = claim(), claim()
        assert re.fullmatch(r"[0-9a-zA-Z]{16,64}", first.nonce)
        assert first.nonce != second.nonce

    def test_expiry_within_the_ten_minutes_the_service_allows(self) -> None:
        c = claim()
        assert timedelta(0) < c.expire_time - c.issue_time <= timedelta(minutes=10)


class TestSignature:
    def test_recovers_to_the_operator_as_the_service_checks_it(self) -> None:
        c = claim()
        signature = sign(c, KEY)
        assert re.fullmatch(r"0x[0-9a-f]{130}", signature)
        assert int(signature[-2:], 16) in (27, 28)
        assert recover_wallet(c.message(), signature) == ADDRESS == c.operator

    def test_another_key_recovers_to_another_address(self) -> None:
        c = claim()
        other = Account.create().key.to_0x_hex()
        assert recover_wallet(c.message(), sign(c, other)) != c.operator


class TestRequest:
    def test_carries_the_signed_fields_and_the_declared_node(self) -> None:
        c = claim()
        declared = node_pb2.Node(
            endpoint="ignored:1",
            region="eu-west-1",
            labels={"tier": "dev"},
            cpu_cores=2,
            memory_bytes=4 << 30,
            gpus=[node_pb2.GpuInventory(model_name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30, count=1)],
        )
        request = register_request(c, sign(c, KEY), declared)
        assert request.node_id == "gpu-node-1"
        assert request.operator == ADDRESS
        assert request.chain_id == 97
        assert request.nonce == c.nonce
        assert request.issue_time.ToDatetime(tzinfo=UTC) == c.issue_time
        assert request.expire_time.ToDatetime(tzinfo=UTC) == c.expire_time
        assert request.node.endpoint == "10.0.0.5:8001"  # the signed endpoint wins
        assert request.node.region == "eu-west-1"
        assert dict(request.node.labels) == {"tier": "dev"}
        assert request.node.gpus[0].count == 1
        assert declared.endpoint == "ignored:1"  # the caller's message is not modified
        # the service rebuilds the message from the request: it must be the one signed
        rebuilt = RegistrationClaim(
            node_id=request.node_id,
            endpoint=request.node.endpoint,
            operator=request.operator,
            chain_id=request.chain_id,
            nonce=request.nonce,
            issue_time=request.issue_time.ToDatetime(tzinfo=UTC),
            expire_time=request.expire_time.ToDatetime(tzinfo=UTC),
        )
        assert recover_wallet(rebuilt.message(), request.signature) == ADDRESS


def test_the_gpu_service_rebuilds_the_same_message() -> None:
    c = claim()
    proof = RegistrationProof(
        node_id=c.node_id,
        endpoint=c.endpoint,
        operator=c.operator,
        chain_id=c.chain_id,
        nonce=c.nonce,
        issue_time=c.issue_time,
        expire_time=c.expire_time,
        signature=sign(c, KEY),
    )
    assert registration_message(proof) == c.message()
