"""The chain client every service uses: AsyncWeb3 over HTTP, the platform's contracts, retries, decoded reverts.

    settings = ChainSettings.from_env()            # BSC_RPC_URL, CHAIN_ID, contract addresses, confirmations
    chain = Chain(settings)
    await chain.check()                            # the node is reachable and on CHAIN_ID
    receipt = await chain.receipt(tx_hash)         # None when the node does not know the transaction
    await chain.retrying("balanceOf", chain.token.functions.balanceOf(wallet).call)

Transport failures (connection refused, timeouts, HTTP 429/5xx) are retried with exponential backoff and
jitter; when the retries run out the call raises `Unavailable` with reason `CHAIN_UNAVAILABLE`. JSON-RPC
errors and reverts are not retried. A revert's custom error comes back from web3 as raw data:
`decode_revert` names it against the ABIs of the platform's contracts.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from eth_abi.abi import decode as abi_decode
from eth_typing import ChecksumAddress
from eth_utils.address import is_checksum_address, to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import BlockNotFound, ContractLogicError, TransactionNotFound
from web3.types import BlockData, TxData, TxReceipt

from servers.common.config import ConfigError, Env
from servers.common.errors import Unavailable

log = structlog.get_logger("far.chain")

T = TypeVar("T")

ARTEFACTS_DIR = Path(__file__).resolve().parents[2] / "generated" / "contracts"
CONTRACTS = ("FARToken", "InferencePayment", "Staking")
BSC_MAINNET_CHAIN_ID = 56
DEV_CHAIN_ID = 97  # BSC testnet, and the local anvil chain of `make run`
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_RETRIED_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class ChainUnavailable(Unavailable):
    """The node could not be reached (or kept failing) after the retries."""

    default_reason = "CHAIN_UNAVAILABLE"


# --- Settings --------------------------------------------------------------------------------------


def _address(env: Env, name: str) -> ChecksumAddress:
    value = env.required(name, "set it to the contract's 0x-prefixed address")
    if not _ADDRESS.match(value):
        raise ConfigError(f"{name}={value!r} is not a 0x-prefixed 20-byte hex address")
    if value[2:] != value[2:].lower() and value[2:] != value[2:].upper() and not is_checksum_address(value):
        raise ConfigError(f"{name}={value!r} has mixed case but a wrong EIP-55 checksum (a typo?)")
    return to_checksum_address(value)


@dataclass(frozen=True)
class ChainSettings:
    """Where the chain and the platform's contracts are, and how deep a payment must be buried."""

    rpc_url: str
    chain_id: int
    token_address: ChecksumAddress
    inference_payment_address: ChecksumAddress
    staking_address: ChecksumAddress
    confirmations: int
    block_time_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ChainSettings:
        """BSC_RPC_URL (http/https), CHAIN_ID (97), FAR_TOKEN_ADDRESS, FAR_INFERENCE_PAYMENT_ADDRESS,
        FAR_STAKING_ADDRESS, CHAIN_CONFIRMATIONS and CHAIN_BLOCK_TIME_SECONDS (3).

        CHAIN_CONFIRMATIONS is the number of blocks, the transaction's own included, that must hold a
        payment before it counts: 15 by default on BSC mainnet (56), 1 elsewhere (the dev chain mines a
        block per transaction and nothing else). A malformed value is a ConfigError of one line.
        """
        env = Env(environ)
        rpc_url = env.url("BSC_RPC_URL", ("http", "https"))
        if rpc_url is None:
            raise ConfigError("BSC_RPC_URL is not set: the chain's JSON-RPC endpoint, http:// or https://")
        chain_id = env.integer("CHAIN_ID", DEV_CHAIN_ID, minimum=1, maximum=2**53)
        default_depth = 15 if chain_id == BSC_MAINNET_CHAIN_ID else 1
        return cls(
            rpc_url=rpc_url,
            chain_id=chain_id,
            token_address=_address(env, "FAR_TOKEN_ADDRESS"),
            inference_payment_address=_address(env, "FAR_INFERENCE_PAYMENT_ADDRESS"),
            staking_address=_address(env, "FAR_STAKING_ADDRESS"),
            confirmations=env.integer("CHAIN_CONFIRMATIONS", default_depth, minimum=1, maximum=10_000),
            block_time_s=env.number("CHAIN_BLOCK_TIME_SECONDS", 3.0, minimum=0.001),
        )


# --- ABIs and reverts ------------------------------------------------------------------------------


@cache
def contract_abi(name: str) -> list[dict[str, Any]]:
    """The ABI of a platform contract from `generated/contracts/<name>.json` (`make generate`)."""
    path = ARTEFACTS_DIR / f"{name}.json"
    try:
        abi: list[dict[str, Any]] = json.loads(path.read_text())["abi"]
    except FileNotFoundError:
        raise ConfigError(f"no contract artefact {path} (run `make generate`)") from None
    return abi


@dataclass(frozen=True)
class RevertReason:
    """A decoded revert: the error's name and its arguments (addresses checksummed)."""

    name: str
    args: tuple[Any, ...]


def _signature_types(inputs: list[dict[str, Any]]) -> list[str]:
    types = []
    for item in inputs:
        kind = str(item["type"])
        if kind.startswith("tuple"):
            kind = f"({','.join(_signature_types(item['components']))}){kind[len('tuple') :]}"
        types.append(kind)
    return types


@cache
def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    table: dict[bytes, tuple[str, list[str]]] = {
        bytes.fromhex("08c379a0"): ("Error", ["string"]),
        bytes.fromhex("4e487b71"): ("Panic", ["uint256"]),
    }
    for contract in CONTRACTS:
        for item in contract_abi(contract):
            if item["type"] == "error":
                types = _signature_types(item["inputs"])
                table[keccak(text=f"{item['name']}({','.join(types)})")[:4]] = (item["name"], types)
    return table


def decode_revert(data: str | bytes | ContractLogicError | None) -> RevertReason | None:
    """Name a revert: `Error(string)`, `Panic(uint256)` or a custom error of FARToken, InferencePayment or
    Staking (their ABIs hold OpenZeppelin's errors too). None for empty or unknown data.

    Accepts the revert data (hex or bytes) or the ContractLogicError / ContractCustomError web3 raised.
    """
    if isinstance(data, ContractLogicError):
        data = data.data if isinstance(data.data, (str, bytes)) else None
    if not data:
        return None
    try:
        raw = bytes(HexBytes(data))
    except ValueError:
        return None
    entry = _error_table().get(raw[:4])
    if entry is None:
        return None
    name, types = entry
    try:
        values = abi_decode(types, raw[4:])
    except Exception:  # malformed arguments: the selector alone is not enough to trust the name
        return None
    args = tuple(to_checksum_address(v) if t == "address" else v for v, t in zip(values, types, strict=True))
    return RevertReason(name, args)


# --- The client ------------------------------------------------------------------------------------


def is_transport_error(error: BaseException) -> bool:
    """Whether a failure is the network's or the node's (worth retrying) rather than the request's."""
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status in _RETRIED_HTTP_STATUSES
    return isinstance(error, (aiohttp.ClientError, TimeoutError, ConnectionError, OSError))


class Chain:
    """AsyncWeb3 on the configured node, the platform's contracts, and RPC calls with retries."""

    def __init__(
        self,
        settings: ChainSettings,
        *,
        timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_backoff_s: float = 3.0,
    ) -> None:
        self.settings = settings
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # web3's own retry covers only some methods and raises the raw error; ours covers every call.
        provider = AsyncHTTPProvider(
            settings.rpc_url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
            exception_retry_configuration=None,
        )
        self.w3: AsyncWeb3[AsyncHTTPProvider] = AsyncWeb3(provider)
        self.token = self.contract("FARToken", settings.token_address)
        self.inference_payment = self.contract("InferencePayment", settings.inference_payment_address)
        self.staking = self.contract("Staking", settings.staking_address)

    @property
    def chain_id(self) -> int:
        return self.settings.chain_id

    def contract(self, name: str, address: str) -> AsyncContract:
        """A handle on the platform contract `name` (its generated ABI) at `address`."""
        return self.w3.eth.contract(address=to_checksum_address(address), abi=contract_abi(name))

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`await call()`, retried on transport errors with exponential backoff and jitter.

        ChainUnavailable (UNAVAILABLE, `CHAIN_UNAVAILABLE`) once the retries are spent; other errors
        (JSON-RPC errors, reverts) are raised at once.
        """
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as error:
                if not is_transport_error(error):
                    raise
                if attempt >= self.retries:
                    log.warning("chain call failed", call=what, attempts=attempt + 1, error=repr(error))
                    raise ChainUnavailable(
                        "the chain node cannot be reached; try again later", metadata={"call": what}
                    ) from error
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                attempt += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    async def check(self) -> None:
        """The node answers and is on CHAIN_ID (ConfigError otherwise: the wrong node is configured)."""
        answered = await self.retrying("eth_chainId", lambda: self.w3.eth.chain_id)
        if answered != self.chain_id:
            raise ConfigError(f"BSC_RPC_URL answers with chain id {answered}, but CHAIN_ID is {self.chain_id}")

    async def block_number(self) -> int:
        number = await self.retrying("eth_blockNumber", lambda: self.w3.eth.block_number)
        return int(number)

    async def block(self, number: int) -> BlockData | None:
        """The canonical block at `number` (without transactions); None beyond the head."""
        try:
            return await self.retrying("eth_getBlockByNumber", lambda: self.w3.eth.get_block(number))
        except BlockNotFound:
            return None

    async def receipt(self, tx_hash: str | bytes) -> TxReceipt | None:
        """The receipt of a mined transaction; None while it is pending or when the node does not know it."""
        try:
            return await self.retrying(
                "eth_getTransactionReceipt", lambda: self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            )
        except TransactionNotFound:
            return None

    async def transaction(self, tx_hash: str | bytes) -> TxData | None:
        """The transaction, mined or pending; None when the node does not know it."""
        try:
            return await self.retrying(
                "eth_getTransactionByHash", lambda: self.w3.eth.get_transaction(HexBytes(tx_hash))
            )
        except TransactionNotFound:
            return None

    async def close(self) -> None:
        await self.w3.provider.disconnect()
