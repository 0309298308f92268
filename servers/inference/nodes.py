"""Which node runs a job: the serving nodes per model, held in memory and refreshed in the background.

The source is the gpu service's `FindServingNodes` (healthy nodes with the model READY, least loaded
first), or a static list (`INFERENCE_STATIC_NODES`) for a node that is attached by hand: a bench or a
single-machine setup. Between refreshes the directory adds this replica's own in-flight requests to
each node's reported load, and keeps a node that just failed out of the choice for a while.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from servers.common.config import ConfigError

log = structlog.get_logger("far.inference.nodes")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node serving a model: its name, Triton endpoint and load as last reported."""

    name: str
    endpoint: str
    load: int = 0
    tls: bool = False


NodeSource = Callable[[str], Awaitable[Sequence[NodeInfo]]]
"""Given a Triton model name, the nodes serving it now."""


def static_nodes(spec: str) -> Mapping[str, tuple[NodeInfo, ...]]:
    """`model=name@host:port,model=name@host:port` (INFERENCE_STATIC_NODES) -> nodes per model."""
    nodes: dict[str, list[NodeInfo]] = defaultdict(list)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        model, _, rest = item.partition("=")
        name, _, endpoint = rest.partition("@")
        if not (model and name and endpoint and ":" in endpoint):
            raise ConfigError(f"INFERENCE_STATIC_NODES: {item!r} is not model=node@host:port")
        nodes[model].append(NodeInfo(name=f"nodes/{name}", endpoint=endpoint))
    return {model: tuple(found) for model, found in nodes.items()}


def static_source(nodes: Mapping[str, Sequence[NodeInfo]]) -> NodeSource:
    async def find(model: str) -> Sequence[NodeInfo]:
        return tuple(nodes.get(model, ()))

    return find


class NodeDirectory:
    """The nodes per model, least loaded first, with local adjustments between refreshes."""

    def __init__(self, source: NodeSource, models: Iterable[str], *, penalty_s: float = 30.0) -> None:
        self._source = source
        self._models = tuple(models)
        self._penalty_s = penalty_s
        self._nodes: dict[str, tuple[NodeInfo, ...]] = {}
        self._in_flight: dict[str, int] = defaultdict(int)
        self._bad_until: dict[str, float] = {}

    async def refresh(self) -> None:
        """Ask the source for every model's nodes (a failure keeps the previous answer for that model)."""
        for model in self._models:
            try:
                self._nodes[model] = tuple(await self._source(model))
            except Exception as error:  # keep serving from the last answer; the next refresh tries again
                log.warning("serving nodes refresh failed", model=model, error=str(error))

    async def run(self, interval_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    def serving(self, model: str) -> int:
        """How many nodes serve the model now (not counting ones that just failed)."""
        now = time.monotonic()
        return sum(1 for node in self._nodes.get(model, ()) if self._bad_until.get(node.endpoint, 0.0) <= now)

    def pick(self, model: str, exclude: Iterable[str] = ()) -> NodeInfo | None:
        """The least loaded usable node for `model` whose endpoint is not in `exclude`."""
        now = time.monotonic()
        excluded = set(exclude)
        candidates = [
            node
            for node in self._nodes.get(model, ())
            if node.endpoint not in excluded and self._bad_until.get(node.endpoint, 0.0) <= now
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda node: node.load + self._in_flight[node.endpoint])

    def started(self, node: NodeInfo) -> None:
        self._in_flight[node.endpoint] += 1

    def finished(self, node: NodeInfo) -> None:
        self._in_flight[node.endpoint] = max(0, self._in_flight[node.endpoint] - 1)

    def failed(self, node: NodeInfo) -> None:
        """Keep `node` out of the choice for the penalty time (it failed a request before its first token)."""
        self._bad_until[node.endpoint] = time.monotonic() + self._penalty_s
