"""RegisterNode: the operator's EIP-191 signature over the exact message the gpu service rebuilds.

The message format is the contract's (protos/far/gpu/v1/gpu_service.proto, RegisterNode); any
difference, down to a trailing newline or fractional seconds, makes the service recover another
address and refuse with SIGNATURE_INVALID.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from eth_account import Account
from eth_account.messages import encode_defunct
from far.gpu.v1 import gpu_service_pb2, node_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from servers.gpu.registration import registration_text

SIGNATURE_LIFETIME = timedelta(minutes=5)


@dataclass(frozen=True)
class RegistrationClaim:
    """What the operator signs: one registration of one node, valid between two instants."""

    node_id: str
    endpoint: str
    operator: str
    chain_id: int
    nonce: str
    issue_time: datetime
    expire_time: datetime

    def message(self) -> str:
        """The text to sign: the gpu service's own definition (servers/gpu/registration.py)."""
        return registration_text(
            node_id=self.node_id,
            endpoint=self.endpoint,
            operator=self.operator,
            chain_id=self.chain_id,
            nonce=self.nonce,
            issue_time=self.issue_time,
            expire_time=self.expire_time,
        )


def new_claim(
    node_id: str, endpoint: str, operator_key: str, chain_id: int, *, now: datetime | None = None
) -> RegistrationClaim:
    """A fresh claim: a new random nonce, issued now (whole seconds), expiring SIGNATURE_LIFETIME later."""
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    return RegistrationClaim(
        node_id=node_id,
        endpoint=endpoint,
        operator=Account.from_key(operator_key).address.lower(),
        chain_id=chain_id,
        nonce=secrets.token_hex(16),
        issue_time=issued,
        expire_time=issued + SIGNATURE_LIFETIME,
    )


def sign(claim: RegistrationClaim, operator_key: str) -> str:
    """The personal_sign signature of the claim's message: 0x + 130 hex digits, v 27 or 28."""
    signed = Account.sign_message(encode_defunct(text=claim.message()), private_key=operator_key)
    return "0x" + bytes(signed.signature).hex()


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def register_request(
    claim: RegistrationClaim, signature: str, node: node_pb2.Node
) -> gpu_service_pb2.RegisterNodeRequest:
    """The RegisterNodeRequest for a signed claim; `node` carries the declared inventory, region and labels."""
    declared = node_pb2.Node()
    declared.CopyFrom(node)
    declared.endpoint = claim.endpoint
    return gpu_service_pb2.RegisterNodeRequest(
        node_id=claim.node_id,
        node=declared,
        operator=claim.operator,
        chain_id=claim.chain_id,
        nonce=claim.nonce,
        issue_time=_timestamp(claim.issue_time),
        expire_time=_timestamp(claim.expire_time),
        signature=signature,
    )
