"""Talking to the chat model the way the inference service does: tritonclient.grpc.aio `stream_infer`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import InferInput

from devstack.processes import http_get, wait_until
from gpu.triton import CHAT_MODEL

# Greedy decoding (temperature 0) of SmolLM2-135M goes on " 4, 5, 6, ..." after this and never stops by itself.
COUNTING = "Count: 1, 2, 3,"
_DTYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


@dataclass(frozen=True)
class Response:
    """One stream response of the chat model, or the error it answered with."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    final: bool = False
    error: str = ""


def tensor(name: str, triton_type: str, values: Sequence[Any]) -> InferInput:
    array = np.array(values, dtype=_DTYPES[triton_type])
    tensor = InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


def chat_inputs(
    *,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
    count_prompt: bool | None = None,
) -> list[InferInput]:
    """The model's inputs; those left at None are not sent (the model's defaults apply)."""
    inputs = []
    if prompt is not None:
        inputs.append(tensor("prompt", "BYTES", [prompt.encode()]))
    if messages is not None:
        inputs.append(tensor("messages", "BYTES", [json.dumps(messages).encode()]))
    if max_tokens is not None:
        inputs.append(tensor("max_tokens", "INT32", [max_tokens]))
    if temperature is not None:
        inputs.append(tensor("temperature", "FP32", [temperature]))
    if top_p is not None:
        inputs.append(tensor("top_p", "FP32", [top_p]))
    if stop:
        inputs.append(tensor("stop", "BYTES", [s.encode() for s in stop]))
    if seed is not None:
        inputs.append(tensor("seed", "INT64", [seed]))
    if max_prompt_tokens is not None:
        inputs.append(tensor("max_prompt_tokens", "INT32", [max_prompt_tokens]))
    if count_prompt is not None:
        inputs.append(tensor("count_prompt", "BOOL", [count_prompt]))
    return inputs


def _response(result: Any, error: Any) -> Response:
    if error is not None:
        return Response(error=str(error))
    return Response(
        # Strict decoding: every piece must be whole UTF-8.
        text=result.as_numpy("text")[0].decode("utf-8"),
        finish_reason=result.as_numpy("finish_reason")[0].decode(),
        prompt_tokens=int(result.as_numpy("prompt_tokens")[0]),
        completion_tokens=int(result.as_numpy("completion_tokens")[0]),
        final=result.get_response().parameters["triton_final_response"].bool_param,
    )


class Stream:
    """One streamed request; iterate it for Responses, `cancel()` it to drop it mid-way."""

    def __init__(self, client: triton_aio.InferenceServerClient, inputs: list[InferInput]) -> None:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": CHAT_MODEL, "inputs": inputs}

        self._call = client.stream_infer(requests())

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Response]:
        async for result, error in self._call:
            yield _response(result, error)

    def cancel(self) -> None:
        self._call.cancel()


async def generate(grpc_url: str, **inputs: Any) -> list[Response]:
    """Every response of one request, in order (the stream ends by itself after the final one)."""
    client = triton_aio.InferenceServerClient(grpc_url)
    try:
        return [response async for response in Stream(client, chat_inputs(**inputs))]
    finally:
        await client.close()


def text_of(responses: Sequence[Response]) -> str:
    return "".join(r.text for r in responses)


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The value of one sample on Triton's metrics endpoint (the chat model's labels are added)."""
    status, body = http_get(metrics_url)
    assert status == 200, body
    wanted = {"model": CHAT_MODEL, "version": "1", **labels}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{wanted} on {metrics_url}")


def wait_idle(metrics_url: str, timeout: float = 30.0) -> None:
    """Until the model generates nothing and nothing waits for a slot (earlier tests' cancelled or abandoned
    requests end a little after their clients let go, and count their tokens when they do)."""
    wait_until(
        lambda: metric(metrics_url, "far_llm_slots_busy") == 0 and metric(metrics_url, "far_llm_requests_waiting") == 0,
        timeout=timeout,
        what="the model to be idle",
    )
