"""Model placement: converge Triton's loaded models on the desired set with its model control API.

Triton (`--model-control-mode=explicit`) loads and unloads whole models; which versions a load brings
up is the model's version policy in the repository. So a desired version other than 0 ("latest") is
checked after the load, and reported as a placement error when the policy did not bring it up.
What the node reports afterwards is always Triton's own repository index, so the service sees what
is actually loaded, with the errors of failed loads as the models' state messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from far.gpu.v1 import gpu_service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gpu.agent.triton_stats import IndexEntry, index_entries

log = structlog.get_logger("gpu.agent.placement")

LOAD_TIMEOUT_S = 600.0
RESIDENT_STATES = frozenset({"READY", "LOADING"})


@dataclass(frozen=True)
class Wanted:
    """A desired model; version 0 means whichever version the repository's policy serves."""

    model: str
    version: int = 0


@dataclass(frozen=True)
class PlacementPlan:
    load: tuple[Wanted, ...]
    unload: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.load and not self.unload


def _ready_versions(index: Iterable[IndexEntry]) -> dict[str, set[int]]:
    ready: dict[str, set[int]] = {}
    for entry in index:
        if entry.state == "READY":
            ready.setdefault(entry.model, set()).add(entry.version)
    return ready


def _satisfied(wanted: Wanted, ready: Mapping[str, set[int]]) -> bool:
    versions = ready.get(wanted.model, set())
    return bool(versions) if wanted.version == 0 else wanted.version in versions


def plan_placement(desired: Sequence[Wanted], index: Iterable[IndexEntry]) -> PlacementPlan:
    """Load every desired model without a matching READY version; unload every resident model not desired."""
    rows = list(index)
    ready = _ready_versions(rows)
    wanted_models = {w.model for w in desired}
    resident = {e.model for e in rows if e.state in RESIDENT_STATES}
    return PlacementPlan(
        load=tuple(w for w in desired if not _satisfied(w, ready)),
        unload=tuple(sorted(resident - wanted_models)),
    )


class Placer:
    """Applies placement instructions in revision order, one at a time, remembering the latest errors."""

    def __init__(self, triton: InferenceServerClient) -> None:
        self._triton = triton
        self._lock = asyncio.Lock()
        self._revision = -1
        self._errors: dict[str, str] = {}

    def errors(self) -> Mapping[str, str]:
        """Per model, why the last placement could not load or unload it."""
        return dict(self._errors)

    async def _index(self) -> list[IndexEntry]:
        response = await self._triton.get_model_repository_index(client_timeout=30.0)
        return index_entries(response.models)

    async def apply(self, instruction: gpu_service_pb2.PlacementInstruction) -> bool:
        """Converge on `instruction.desired`; returns whether anything was done.

        Revision 0 with nothing desired is the placement of a node nobody placed models on yet: Triton
        is left as it is (models it was started with stay loaded). A revision older than the last one
        applied is ignored; the same revision again is applied again (it converges, e.g. after Triton
        restarted).
        """
        async with self._lock:
            if instruction.revision < self._revision:
                log.info("placement_stale", revision=instruction.revision, applied=self._revision)
                return False
            self._revision = instruction.revision
            if instruction.revision == 0 and not instruction.desired:
                return False
            desired = [Wanted(p.model, p.version) for p in instruction.desired]
            plan = plan_placement(desired, await self._index())
            if plan.empty:
                self._errors = {}
                return False
            log.info(
                "placement_apply",
                revision=instruction.revision,
                load=[w.model for w in plan.load],
                unload=list(plan.unload),
            )
            self._errors = await self._execute(plan)
            return True

    async def _execute(self, plan: PlacementPlan) -> dict[str, str]:
        errors: dict[str, str] = {}
        for wanted in plan.load:
            try:
                await self._triton.load_model(wanted.model, client_timeout=LOAD_TIMEOUT_S)
            except InferenceServerException as exc:
                errors[wanted.model] = f"load failed: {exc.message()}"
                log.warning("model_load_failed", model=wanted.model, error=exc.message())
        if any(w.version for w in plan.load):
            ready = _ready_versions(await self._index())
            for wanted in plan.load:
                if wanted.model not in errors and not _satisfied(wanted, ready):
                    errors[wanted.model] = (
                        f"version {wanted.version} is not served by the model's version policy "
                        f"(ready: {sorted(ready.get(wanted.model, set())) or 'none'})"
                    )
        for model in plan.unload:
            try:
                await self._triton.unload_model(model, client_timeout=LOAD_TIMEOUT_S)
            except InferenceServerException as exc:
                errors[model] = f"unload failed: {exc.message()}"
                log.warning("model_unload_failed", model=model, error=exc.message())
        return errors
