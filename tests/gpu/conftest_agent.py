"""The node agent in tests: a real `python -m gpu.agent` process against a real tritonserver and the gpu service.

    triton = await start_agent_triton(workdir)   # in a module-scoped fixture; triton.stop() after
    agent = await start_agent(tmp_path, gpu_port=gpu_server.port, triton=triton, operator=Operator.create(tmp_path),
                        node_id=unique_node_id())
    await agent.wait_event("registered")
    ...
    assert await agent.stop() == 0     # SIGTERM: the agent closes its stream and exits 0

The gpu service runs in the test's own event loop, so everything that waits here is async: a blocking wait
would hold up the service the agent is talking to. Processes are started from a worker thread: from the
main thread ManagedProcess runs a Python pre-exec hook in the forked child, which crashed (SIGSEGV, before
exec) while the in-process gRPC server's threads were busy.

The agent tests get a tritonserver of their own (one per module) rather than the model's session `triton`:
placement round trips unload the model, which would pull it from under other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eth_account import Account

from devstack.node import write_operator_key
from devstack.processes import ManagedProcess
from devstack.stack import python_env
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess
from tests.integration.gpu_support import CHAIN_ID

MODEL = CHAT_MODEL
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], *, what: str, within_s: float = 30.0) -> T:
    """Poll `check` until it returns something truthy (returned); AssertionError after `within_s` seconds."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def start_agent_triton(workdir: Path) -> TritonProcess:
    """A tritonserver on the model repository with the model loaded (one generation slot: tests only place it)."""
    return await asyncio.to_thread(
        TritonProcess.start, MODEL_REPOSITORY, workdir, load_models=[MODEL], env={"FAR_LLAMA_SLOTS": "1"}
    )


@dataclass
class Operator:
    """An operator wallet whose key sits in a 0600 file, as the agent reads it."""

    address: str
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> Operator:
        account = Account.create()
        key_file = write_operator_key(directory / f"operator-{secrets.token_hex(4)}.key", account.key.to_0x_hex())
        return cls(address=account.address.lower(), key_file=key_file)


@dataclass
class AgentProcess:
    process: ManagedProcess
    node_id: str

    @property
    def name(self) -> str:
        return f"nodes/{self.node_id}"

    def events(self, event: str) -> list[dict[str, Any]]:
        """The agent's JSON log lines whose `event` is `event`."""
        found = []
        for line in self.process.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
        return found

    async def wait_event(
        self, event: str, within_s: float = 30.0, *, count: int = 1, **fields: object
    ) -> dict[str, Any]:
        """The `count`th log line of `event` with these field values, waiting for it to be written."""

        async def match() -> dict[str, Any] | None:
            self.process.check(f"while waiting for its {event} log line")
            found = [e for e in self.events(event) if all(e.get(k) == v for k, v in fields.items())]
            return found[count - 1] if len(found) >= count else None

        return await eventually(match, what=f"agent log event {event} {fields}", within_s=within_s)

    async def wait_exit(self, within_s: float = 30.0) -> int:
        """The exit status of an agent that stops by itself."""

        async def exited() -> bool:
            return not self.process.alive()

        await eventually(exited, what=f"{self.name}'s agent to exit", within_s=within_s)
        code = self.process.stop(timeout=1)
        assert code is not None
        return code

    async def stop(self) -> int | None:
        """SIGTERM and wait (in a thread: the gpu service in this loop must answer the agent's goodbye)."""
        return await asyncio.to_thread(self.process.stop, 15)


async def start_agent(
    workdir: Path,
    *,
    gpu_port: int,
    triton: TritonProcess | None,
    operator: Operator,
    node_id: str,
    extra_env: Mapping[str, str] | None = None,
) -> AgentProcess:
    """`python -m gpu.agent` attached to `triton`, or (None) starting a tritonserver of its own with the model."""
    env = {
        "AGENT_NODE_ID": node_id,
        "AGENT_GPU_SERVICE": f"127.0.0.1:{gpu_port}",
        "AGENT_OPERATOR_KEY_FILE": str(operator.key_file),
        "AGENT_CHAIN_ID": str(CHAIN_ID),
    }
    if triton is not None:
        env |= {"AGENT_TRITON_GRPC": triton.grpc_url, "AGENT_TRITON_METRICS": triton.metrics_url}
    else:
        env |= {
            "AGENT_START_TRITON": "1",
            "AGENT_TRITON_LOAD_MODELS": MODEL,
            "AGENT_TRITON_WORKDIR": str(workdir / f"triton-{node_id}"),
            "FAR_LLAMA_SLOTS": "1",
        }
    process = ManagedProcess(
        f"gpu-agent-{node_id}",
        [sys.executable, "-m", "gpu.agent"],
        log_path=workdir / f"agent-{node_id}-{secrets.token_hex(3)}.log",
        env=python_env({**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "info", **env, **(extra_env or {})}),
        cwd=workdir,
    )
    await asyncio.to_thread(process.start)
    return AgentProcess(process=process, node_id=node_id)
