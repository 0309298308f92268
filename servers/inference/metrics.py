"""Prometheus metrics of the inference path, per model: what a caller waits for and what the fleet produces.

Time to first token counts from job creation (queue wait included), as `Job.time_to_first_token` does; time
per output token is the mean gap between a job's tokens after the first; queue time runs from admission to
the start on a node. Time to model is what the latency budget is about: how long a call that starts at once
spends in the platform (interceptors, validation, node choice) before its Triton request goes out; the model's
time to first token runs from that request to its first token. Exposed on the server's METRICS_LISTEN with the
common RPC metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "far_inference_time_to_first_token_seconds",
    "From job creation to its first completion token (queue wait included).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "far_inference_time_per_output_token_seconds",
    "Mean time between a job's completion tokens after the first.",
    ["model"],
    buckets=_TOKEN_BUCKETS,
)
TIME_TO_MODEL = Histogram(
    "far_inference_time_to_model_seconds",
    "From a Generate call's arrival (the first interceptor) to its Triton request going out, for calls that"
    " start at once: the platform's own work in front of the model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
MODEL_TIME_TO_FIRST_TOKEN = Histogram(
    "far_inference_model_time_to_first_token_seconds",
    "From a job's Triton request going out to the first token coming back: the model's own time to first"
    " token, as this service sees it (the platform's share of a caller's is the rest).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "far_inference_queue_time_seconds",
    "From admission to the start on a node.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter(
    "far_inference_tokens_total", "Tokens processed, by model and kind (prompt, completion).", ["model", "kind"]
)
JOBS_ENDED = Counter("far_inference_jobs_total", "Jobs that ended, by model and final state.", ["model", "state"])
NODE_FAILOVERS = Counter(
    "far_inference_node_failovers_total", "Nodes that failed a job before its first token (it moved on).", ["model"]
)
SLOW_ACCEPTS = Counter(
    "far_inference_slow_accepts_total",
    "Generate jobs started at once whose node took longer than the open job transaction may wait to accept the"
    " prompt (the job was written after the node's reply instead of beside it).",
    ["model"],
)
