"""gpu.agent.triton_stats: Triton's metrics text and repository index into ModelStats.

data/triton_metrics.txt is tritonserver 2.51's /metrics captured under real traffic (the SmolLM2 model with
one generation slot: six requests done, one generating and one waiting for the slot when it was read).
"""

from __future__ import annotations

from pathlib import Path

from far.gpu.v1 import node_pb2
from tritonclient.grpc import service_pb2

from gpu.agent.triton_stats import ModelCounters, index_entries, model_stats, parse_metrics

METRICS = (Path(__file__).parent / "data" / "triton_metrics.txt").read_text()
LLM = "smollm2-135m-instruct"


def index(*rows: tuple[str, str, str, str]) -> list[service_pb2.RepositoryIndexResponse.ModelIndex]:
    response = service_pb2.RepositoryIndexResponse(
        models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(name=name, version=version, state=state, reason=reason)
            for name, version, state, reason in rows
        ]
    )
    return list(response.models)


class TestParseMetrics:
    def test_real_metrics_text(self) -> None:
        assert parse_metrics(METRICS) == {
            (LLM, 1): ModelCounters(
                success_count=6,
                failure_count=0,
                execution_count=6,
                queue_us=440,
                compute_us=282 + 64566 + 14,  # input + infer + output
                pending_requests=0,
                active_requests=2,  # far_llm_slots_busy 1 + far_llm_requests_waiting 1
            )
        }

    def test_failures_are_summed_over_reasons(self) -> None:
        text = METRICS.replace('reason="BACKEND",version="1"} 0', 'reason="BACKEND",version="1"} 2').replace(
            'reason="OTHER",version="1"} 0', 'reason="OTHER",version="1"} 1'
        )
        assert parse_metrics(text)[(LLM, 1)].failure_count == 3

    def test_series_without_model_and_version_are_ignored(self) -> None:
        text = "\n".join(line for line in METRICS.splitlines() if "model=" not in line) + "\n"
        assert "nv_cpu_utilization" in text
        assert parse_metrics(text) == {}


class TestIndex:
    def test_versionless_rows_are_models_never_loaded(self) -> None:
        rows = index_entries(index((LLM, "1", "READY", ""), ("other", "", "", "")))
        assert [(r.model, r.version, r.state) for r in rows] == [(LLM, 1, "READY")]


class TestModelStats:
    def test_counters_join_the_index(self) -> None:
        stats = model_stats(index_entries(index((LLM, "1", "READY", ""))), parse_metrics(METRICS))
        assert len(stats) == 1
        s = stats[0]
        assert (s.model, s.version, s.state) == (LLM, 1, node_pb2.MODEL_STATE_READY)
        assert s.inference_count == 6
        assert s.failure_count == 0
        assert s.execution_count == 6
        assert s.cumulative_queue_duration.ToMicroseconds() == 440
        assert s.cumulative_compute_duration.ToMicroseconds() == 64862
        assert s.active_requests == 2
        assert s.pending_requests == 0

    def test_unloaded_version_keeps_tritons_reason_and_zero_counters(self) -> None:
        stats = model_stats(index_entries(index((LLM, "1", "UNAVAILABLE", "unloaded"))), {})
        assert stats[0].state == node_pb2.MODEL_STATE_UNAVAILABLE
        assert stats[0].state_message == "unloaded"
        assert stats[0].inference_count == 0

    def test_placement_errors_explain_models_triton_could_not_load(self) -> None:
        rows = index_entries(index((LLM, "1", "READY", ""), ("broken", "1", "UNAVAILABLE", "")))
        errors = {"broken": "load failed: bad config", "missing": "load failed: not in the repository", LLM: "stale"}
        stats = {s.model: s for s in model_stats(rows, {}, errors)}
        assert stats["broken"].state_message == "load failed: bad config"
        assert stats["missing"].state == node_pb2.MODEL_STATE_UNAVAILABLE
        assert stats["missing"].state_message == "load failed: not in the repository"
        assert stats[LLM].state_message == ""  # READY: an old error no longer applies
        assert list(stats) == ["broken", LLM, "missing"]  # Triton's models by name, then the ones it lacks

    def test_unknown_index_state_is_unspecified(self) -> None:
        stats = model_stats(index_entries(index((LLM, "1", "SOMETHING_NEW", ""))), {})
        assert stats[0].state == node_pb2.MODEL_STATE_UNSPECIFIED
