"""The local chain: anvil from node_modules, and the FAR contracts deployed from generated/contracts/.

    anvil = start_anvil(log_path)                  # a free port, chain id 97, Cancun; stop() by PID
    w3 = anvil.web3()
    deployment = deploy_platform(w3, dev_account(0))
    deployment.env()                               # {"FAR_TOKEN_ADDRESS": ..., ...}

`make run` (devstack/__main__.py) uses `start_dev_chain` when BSC_RPC_URL is unset: anvil on
ANVIL_PORT (8545), the three contracts deployed, dev accounts funded, and the deployments file written.
The dev accounts are anvil's, derived from its public default mnemonic: never use them elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.types import TxParams, TxReceipt

from devstack.catalog import ROOT
from devstack.processes import ManagedProcess, PortInUse, free_port, port_free, wait_until

ARTEFACTS_DIR = ROOT / "generated" / "contracts"
DEV_CHAIN_ID = 97
DEV_MNEMONIC = "test test test test test test test test test test test junk"  # anvil's default
ANVIL_DEFAULT_PORT = 8545
FAR = 10**18

# Where services find the contracts (environment variables), by artefact name.
ADDRESS_ENV_VARS = {
    "FARToken": "FAR_TOKEN_ADDRESS",
    "InferencePayment": "FAR_INFERENCE_PAYMENT_ADDRESS",
    "Staking": "FAR_STAKING_ADDRESS",
}
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class ChainError(RuntimeError):
    """The chain could not be started, reached or set up."""


def anvil_binary() -> Path:
    """The anvil binary npm installed for this platform (run directly, without the node wrapper)."""
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system(), platform.system().lower())
    machine = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    path = ROOT / "node_modules" / "@foundry-rs" / f"anvil-{system}-{machine}" / "bin" / "anvil"
    if not path.exists():
        raise ChainError(f"anvil is not installed at {path} (run `make install`)")
    return path


def rpc(url: str, method: str, params: Sequence[Any] = (), timeout: float = 5.0) -> Any:
    """One JSON-RPC call over HTTP; the `result`, or ChainError with the node's error."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a local node
        answer = json.loads(response.read())
    if "error" in answer:
        raise ChainError(f"{method}: {answer['error']}")
    return answer["result"]


def _answers(url: str) -> bool:
    try:
        rpc(url, "eth_chainId", timeout=1.0)
    except (urllib.error.URLError, OSError, ChainError):
        return False
    return True


class Anvil:
    """A running anvil process: its JSON-RPC URL, chain id, and PID (stopped with `stop()`)."""

    def __init__(self, process: ManagedProcess, url: str, chain_id: int) -> None:
        self.process = process
        self.url = url
        self.chain_id = chain_id

    @property
    def pid(self) -> int:
        return self.process.pid

    def web3(self, timeout: float = 10.0) -> Web3:
        return Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": timeout}))

    def rpc(self, method: str, *params: Any) -> Any:
        return rpc(self.url, method, params)

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.process.stop(timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_anvil(
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    chain_id: int = DEV_CHAIN_ID,
    accounts: int = 10,
    timeout: float = 15.0,
) -> Anvil:
    """Start anvil (Cancun, `chain_id`, anvil's default mnemonic) and wait until it answers.

    `port` 0 picks a free one. Instant mining: every transaction is mined in a block of its own.
    """
    if port and not port_free(host, port):
        raise PortInUse(f"port {port} on {host} (anvil) is already in use")
    port = port or free_port(host)
    argv = [
        str(anvil_binary()),
        "--host",
        host,
        "--port",
        str(port),
        "--chain-id",
        str(chain_id),
        "--hardfork",
        "cancun",
        "--accounts",
        str(accounts),
        "--mnemonic",
        DEV_MNEMONIC,
    ]
    process = ManagedProcess("anvil", argv, log_path=log_path).start()
    url = f"http://{host}:{port}"
    try:
        wait_until(lambda: _answers(url), timeout=timeout, what=f"anvil on {url}", watch=[process])
        answered = int(rpc(url, "eth_chainId"), 16)
        if answered != chain_id:
            raise ChainError(f"the node on {url} has chain id {answered}, not {chain_id} (another node on the port?)")
    except BaseException:
        process.stop(timeout=5)
        raise
    return Anvil(process, url, chain_id)


@cache
def dev_account(index: int) -> LocalAccount:
    """Anvil's dev account `index` (0 deploys and owns the contracts in the dev chain)."""
    Account.enable_unaudited_hdwallet_features()
    account: LocalAccount = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    return account


# --- Contracts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artefact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


@cache
def load_artefact(name: str) -> Artefact:
    """`generated/contracts/<name>.json` (written by `make generate`)."""
    path = ARTEFACTS_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainError(f"no contract artefact {path} (run `make generate`)") from None
    return Artefact(name=name, abi=data["abi"], bytecode=data["bytecode"])


def contract_at(w3: Web3, name: str, address: str) -> Contract:
    """The deployed contract `name` (its artefact's ABI) at `address`."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=load_artefact(name).abi)


def transact(
    w3: Web3, sender: LocalAccount, call: ContractFunction | ContractConstructor, *, gas: int | None = None
) -> TxReceipt:
    """Sign `call` as `sender`, send it, wait for its receipt; ChainError if it reverted.

    Without `gas` the node estimates it, so a call that would revert raises web3's
    ContractCustomError (its `data` is the error) before anything is sent.
    """
    params: dict[str, Any] = {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address)}
    if gas is not None:
        params["gas"] = gas
    tx = call.build_transaction(cast(TxParams, params))
    signed = sender.sign_transaction(cast(dict[str, Any], tx))
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    if receipt["status"] != 1:
        raise ChainError(f"transaction {tx_hash.to_0x_hex()} reverted")
    return receipt


def deploy(w3: Web3, sender: LocalAccount, name: str, *args: Any) -> tuple[str, TxReceipt]:
    """Deploy the artefact `name` with constructor `args`: (address, receipt)."""
    artefact = load_artefact(name)
    factory = w3.eth.contract(abi=artefact.abi, bytecode=artefact.bytecode)
    receipt = transact(w3, sender, factory.constructor(*args))
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError(f"deploying {name} created no contract")
    return str(address), receipt


@dataclass
class Deployment:
    """Where the platform's contracts live on one chain, and the block each was deployed in."""

    chain_id: int
    addresses: dict[str, str]
    blocks: dict[str, int] = field(default_factory=dict)
    owner: str = ""

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV_VARS[name]: address for name, address in self.addresses.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "chainId": self.chain_id,
            "owner": self.owner,
            "contracts": {
                name: {"address": address, "block": self.blocks.get(name), "env": ADDRESS_ENV_VARS[name]}
                for name, address in sorted(self.addresses.items())
            },
        }


def deploy_platform(
    w3: Web3,
    deployer: LocalAccount,
    *,
    supply: int = 1_000_000_000 * FAR,
    rewards_duration: int = 30 * 24 * 3600,
) -> Deployment:
    """FARToken (the whole `supply` to the deployer), InferencePayment and Staking (FAR for FAR),
    all owned by `deployer`."""
    token, token_receipt = deploy(w3, deployer, "FARToken", deployer.address, supply)
    payment, payment_receipt = deploy(w3, deployer, "InferencePayment", token, deployer.address)
    staking, staking_receipt = deploy(w3, deployer, "Staking", token, token, rewards_duration, deployer.address)
    return Deployment(
        chain_id=w3.eth.chain_id,
        addresses={"FARToken": token, "InferencePayment": payment, "Staking": staking},
        blocks={
            "FARToken": token_receipt["blockNumber"],
            "InferencePayment": payment_receipt["blockNumber"],
            "Staking": staking_receipt["blockNumber"],
        },
        owner=deployer.address,
    )


def addresses_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The contract addresses given in the environment; ValueError naming every missing or bad one."""
    problems: list[str] = []
    addresses: dict[str, str] = {}
    for name, var in ADDRESS_ENV_VARS.items():
        value = environ.get(var, "").strip()
        if not value:
            problems.append(f"{var} is not set")
        elif not _ADDRESS.match(value):
            problems.append(f"{var}={value!r} is not a 0x-prefixed 20-byte address")
        else:
            addresses[name] = Web3.to_checksum_address(value)
    if problems:
        raise ValueError("with BSC_RPC_URL set the contract addresses must be given: " + "; ".join(problems))
    return addresses


# --- The dev chain of `make run` -------------------------------------------------------------------

DEV_MODEL_PRICES = {"smollm2-135m-instruct": 10**12}  # FAR wei per token: 0.000001 FAR
DEV_ACCOUNT_FUNDING = 1_000_000 * FAR
DEV_FUNDED_ACCOUNTS = 5  # accounts 1..5; account 0 deploys and keeps the rest
DEV_STAKING_REWARD = 1_000_000 * FAR  # one 30-day reward period, started at deployment


def model_key(model_id: str) -> bytes:
    """The contract's `modelId` of a model: keccak256 of the UTF-8 bytes of `{model}`."""
    return bytes(Web3.keccak(text=model_id))


def job_key(job_id: str) -> bytes:
    """The contract's `jobId` of a job (a quote's `payment_job_id`): keccak256 of the UTF-8 bytes of `{job}`."""
    return bytes(Web3.keccak(text=job_id))


@dataclass
class DevChain:
    anvil: Anvil
    deployment: Deployment
    deployments_file: Path
    funded: list[str]

    def env(self) -> dict[str, str]:
        return {"BSC_RPC_URL": self.anvil.url, **self.deployment.env()}

    def stop(self) -> int | None:
        return self.anvil.stop()


def set_up_dev_chain(w3: Web3, deployment: Deployment, owner: LocalAccount, accounts: Sequence[str]) -> None:
    """Fund `accounts` with FAR, price the dev models, start a staking reward period."""
    token = contract_at(w3, "FARToken", deployment.addresses["FARToken"])
    payment = contract_at(w3, "InferencePayment", deployment.addresses["InferencePayment"])
    staking = contract_at(w3, "Staking", deployment.addresses["Staking"])
    for address in accounts:
        transact(w3, owner, token.functions.transfer(address, DEV_ACCOUNT_FUNDING))
    for model, price in DEV_MODEL_PRICES.items():
        transact(w3, owner, payment.functions.setPrice(model_key(model), price))
    transact(w3, owner, token.functions.approve(staking.address, DEV_STAKING_REWARD))
    transact(w3, owner, staking.functions.notifyRewardAmount(DEV_STAKING_REWARD))


def start_dev_chain(deployments_file: Path, log_path: Path, *, port: int = ANVIL_DEFAULT_PORT) -> DevChain:
    """anvil on `port` (chain id 97), the contracts deployed and set up, `deployments_file` written.

    anvil keeps no state between runs; the same deployer and order give the same addresses each time.
    """
    anvil = start_anvil(log_path, port=port)
    try:
        w3 = anvil.web3()
        owner = dev_account(0)
        deployment = deploy_platform(w3, owner)
        funded = [str(dev_account(i).address) for i in range(1, DEV_FUNDED_ACCOUNTS + 1)]
        set_up_dev_chain(w3, deployment, owner, funded)
        document = {
            "rpcUrl": anvil.url,
            **deployment.to_json(),
            "devAccounts": {
                "mnemonic": DEV_MNEMONIC,
                "note": "anvil's public dev mnemonic: never use these keys on a real chain",
                "farEach": str(DEV_ACCOUNT_FUNDING),
                "funded": funded,
            },
            "modelPrices": {model: str(price) for model, price in DEV_MODEL_PRICES.items()},
        }
        deployments_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = deployments_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, deployments_file)
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, deployment=deployment, deployments_file=deployments_file, funded=funded)


def devstack_chain(
    environ: Mapping[str, str], run_dir: Path, log_dir: Path, say: Callable[[str], None]
) -> tuple[dict[str, str], DevChain | None]:
    """The chain step of `make run`: the variables to give the services, and the dev chain if one was started.

    BSC_RPC_URL set: nothing is deployed, and FAR_TOKEN_ADDRESS, FAR_INFERENCE_PAYMENT_ADDRESS and
    FAR_STAKING_ADDRESS must be set (ValueError otherwise). Unset: `start_dev_chain` on ANVIL_PORT (8545;
    0 picks a free port).
    """
    if environ.get("BSC_RPC_URL"):
        addresses = addresses_from_env(environ)
        say(f"chain: using BSC_RPC_URL; contracts {', '.join(f'{n} {a}' for n, a in addresses.items())}")
        return {}, None
    raw_port = environ.get("ANVIL_PORT", "")
    if raw_port and not (raw_port.isdigit() and int(raw_port) < 65536):
        raise ValueError(f"ANVIL_PORT={raw_port!r} is not a port number")
    port = int(raw_port) if raw_port else ANVIL_DEFAULT_PORT
    say(f"chain: starting anvil (chain id {DEV_CHAIN_ID}) on port {port or 'any'}, deploying the contracts ...")
    chain = start_dev_chain(run_dir / "chain" / "deployments.json", log_dir / "anvil.log", port=port)
    say(f"chain: ready (pid {chain.anvil.pid}) {chain.anvil.url}; deployments in {chain.deployments_file}")
    for name, value in chain.env().items():
        say(f"chain:   {name}={value}")
    return chain.env(), chain
