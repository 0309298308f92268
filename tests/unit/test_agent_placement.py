"""gpu.agent.placement: what to load and unload to go from Triton's repository index to the desired set."""

from __future__ import annotations

from gpu.agent.placement import PlacementPlan, Wanted, plan_placement
from gpu.agent.triton_stats import IndexEntry

LLM = "smollm2-135m-instruct"


def row(model: str, version: int, state: str, reason: str = "") -> IndexEntry:
    return IndexEntry(model=model, version=version, state=state, reason=reason)


class TestPlan:
    def test_nothing_to_do_when_the_desired_model_is_ready(self) -> None:
        plan = plan_placement([Wanted(LLM)], [row(LLM, 1, "READY")])
        assert plan == PlacementPlan(load=(), unload=())
        assert plan.empty

    def test_loads_a_desired_model_that_is_unloaded_or_failed(self) -> None:
        index = [row(LLM, 1, "UNAVAILABLE", "unloaded"), row("other", 1, "UNAVAILABLE", "load failed")]
        plan = plan_placement([Wanted(LLM), Wanted("other")], index)
        assert plan.load == (Wanted(LLM), Wanted("other"))
        assert plan.unload == ()

    def test_loads_a_model_triton_does_not_list_yet(self) -> None:
        assert plan_placement([Wanted("new-model")], []).load == (Wanted("new-model"),)

    def test_a_specific_version_needs_that_version_ready(self) -> None:
        index = [row(LLM, 1, "READY"), row(LLM, 2, "UNAVAILABLE")]
        assert plan_placement([Wanted(LLM, 1)], index).empty
        assert plan_placement([Wanted(LLM, 2)], index).load == (Wanted(LLM, 2),)
        assert plan_placement([Wanted(LLM, 0)], index).empty  # 0: whichever version is served

    def test_unloads_resident_models_not_desired_in_name_order(self) -> None:
        index = [row("b", 1, "READY"), row("a", 3, "LOADING"), row("c", 1, "UNAVAILABLE"), row(LLM, 1, "READY")]
        plan = plan_placement([Wanted(LLM)], index)
        assert plan.load == ()
        assert plan.unload == ("a", "b")  # c is not loaded: nothing to unload

    def test_empty_desired_set_unloads_everything_loaded(self) -> None:
        plan = plan_placement([], [row(LLM, 1, "READY"), row(LLM, 2, "READY")])
        assert plan == PlacementPlan(load=(), unload=(LLM,))

    def test_loading_counts_as_resident_but_not_as_ready(self) -> None:
        plan = plan_placement([Wanted(LLM)], [row(LLM, 1, "LOADING")])
        assert plan.load == (Wanted(LLM),)  # asked again: Triton answers when the load in flight ends
        assert plan.unload == ()
