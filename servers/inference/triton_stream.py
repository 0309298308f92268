"""One generation on one node: tritonclient's asyncio gRPC stream to the node's Triton, as pieces and a finish.

The model contract (gpu/models/README.md): inputs `prompt` or `messages` (JSON), `max_tokens`,
`temperature`, `top_p`, `stop`, `seed`; each response carries the new `text` and the running
`completion_tokens` / `prompt_tokens`, and the last one a `finish_reason`. Here each response becomes a
`Piece` (text, offset, token count) and the last one also a `Finish`.

Closing the iterator early (the caller went away, the job was cancelled) cancels the Triton request:
the model checks `is_cancelled()` between tokens, so the node stops within about one token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

OUTPUTS = ("text", "finish_reason", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True, slots=True)
class Generation:
    """What to generate: exactly one of `prompt` / `messages` (role + content dicts), and the sampling."""

    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    max_prompt_tokens: int | None = None
    """The most prompt tokens the caller paid for: the model refuses longer prompts (`PROMPT_TOO_LONG`) and,
    when this is set, first answers with an `Accepted` (the prompt's length) before its prefill."""


@dataclass(frozen=True, slots=True)
class Piece:
    """New text and the completion tokens it covers: `[offset, offset + token_count)`."""

    text: str
    offset: int
    token_count: int


@dataclass(frozen=True, slots=True)
class Finish:
    """How the model ended: `reason` is the model's finish_reason (stop, length, cancelled, error)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """The model took the prompt (within `max_prompt_tokens`) and starts its prefill."""

    prompt_tokens: int


class NodeError(Exception):
    """The node failed the request: a transport failure or an error response from Triton."""


class PromptTooLong(Exception):
    """The model refused the prompt: more tokens than `max_prompt_tokens`. Not a node failure."""


def _bytes_input(name: str, values: Sequence[str]) -> InferInput:
    tensor = InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode() for value in values], dtype=np.object_))
    return tensor


def _scalar_input(name: str, value: float | int, datatype: str, dtype: Any) -> InferInput:
    tensor = InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=dtype))
    return tensor


def build_inputs(generation: Generation) -> list[InferInput]:
    """The Triton inputs of a generation (unset sampling fields are left to the model's defaults)."""
    if (generation.prompt is None) == (generation.messages is None):
        raise ValueError("exactly one of prompt and messages")
    inputs = (
        [_bytes_input("prompt", [generation.prompt])]
        if generation.prompt is not None
        else [_bytes_input("messages", [json.dumps(list(generation.messages or ()))])]
    )
    inputs.append(_scalar_input("max_tokens", generation.max_tokens, "INT32", np.int32))
    if generation.temperature is not None:
        inputs.append(_scalar_input("temperature", generation.temperature, "FP32", np.float32))
    if generation.top_p is not None:
        inputs.append(_scalar_input("top_p", generation.top_p, "FP32", np.float32))
    if generation.stop:
        inputs.append(_bytes_input("stop", list(generation.stop)))
    if generation.seed is not None:
        inputs.append(_scalar_input("seed", generation.seed, "INT64", np.int64))
    if generation.max_prompt_tokens is not None:
        inputs.append(_scalar_input("max_prompt_tokens", generation.max_prompt_tokens, "INT32", np.int32))
    return inputs


def _first(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return array.reshape(-1)[0]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


async def _one(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield request


async def _results(responses: AsyncIterator[tuple[Any, Any]]) -> AsyncIterator[Any]:
    """The results of a stream; an error response raises (`_refusal`)."""
    async for result, error in responses:
        if error is not None:
            raise _refusal(error)
        if result is not None:
            yield result


def _refusal(error: Any) -> Exception:
    """An error response from the model: PromptTooLong when the prompt was over the limit, else NodeError."""
    if "PROMPT_TOO_LONG" in str(error):
        return PromptTooLong(str(error).split("PROMPT_TOO_LONG: ", 1)[-1])
    return NodeError(str(error))


async def count_prompt(
    client: InferenceServerClient, model: str, generation: Generation, *, headers: dict[str, str] | None = None
) -> int:
    """The prompt's length in tokens on the node's tokenizer (the model's `count_prompt`: no slot, nothing
    generated, answered while every slot is busy); PromptTooLong past `max_prompt_tokens`, NodeError if the node
    fails or does not count."""
    inputs = build_inputs(generation)
    inputs.append(_scalar_input("count_prompt", True, "BOOL", np.bool_))
    request = {"model_name": model, "inputs": inputs, "outputs": [InferRequestedOutput(n) for n in OUTPUTS]}
    responses = client.stream_infer(_one(request), headers=headers)
    try:
        async for result in _results(responses):
            if _text(_first(result, "finish_reason")) != "counted":
                raise NodeError("the node answered a count with something else (a model without count_prompt?)")
            return int(_first(result, "prompt_tokens"))
        raise NodeError("the node ended the stream without a count")
    except (InferenceServerException, grpc.RpcError) as error:
        raise NodeError(str(error)) from error
    finally:
        responses.cancel()


async def stream_generation(
    client: InferenceServerClient,
    model: str,
    generation: Generation,
    *,
    request_id: str = "",
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Accepted | Piece | Finish]:
    """Pieces as Triton streams them, then one Finish (after an Accepted first when `max_prompt_tokens` is set);
    PromptTooLong if the model refuses the prompt, NodeError if the node fails."""
    request = {
        "model_name": model,
        "inputs": build_inputs(generation),
        "outputs": [InferRequestedOutput(name) for name in OUTPUTS],
        "request_id": request_id,
    }
    responses = client.stream_infer(_one(request), headers=headers)
    seen = 0
    held = ""
    finished = False
    try:
        async for result in _results(responses):
            text = _text(_first(result, "text"))
            completion = _first(result, "completion_tokens")
            reason_now = _text(_first(result, "finish_reason"))
            if not text and not reason_now and completion is not None and int(completion) == 0:
                prompt = _first(result, "prompt_tokens")
                yield Accepted(int(prompt) if prompt is not None else 0)
                continue
            held += text
            completion_tokens = max(int(completion), seen) if completion is not None else seen
            if completion_tokens > seen:
                # A piece covers at least one token; text that came without a new token waits for the next.
                yield Piece(held, seen, completion_tokens - seen)
                held, seen = "", completion_tokens
            reason = reason_now
            if reason:
                if held:
                    # Text released at the end without a new token (e.g. held back as a possible stop
                    # sequence): a last piece of its own, so offsets stay contiguous with counts of at least 1.
                    yield Piece(held, seen, 1)
                prompt = _first(result, "prompt_tokens")
                finished = True
                yield Finish(reason, int(prompt) if prompt is not None else 0, completion_tokens)
                return
        raise NodeError("the node ended the stream without a finish reason")
    except (InferenceServerException, grpc.RpcError) as error:
        raise NodeError(str(error)) from error
    finally:
        if not finished:
            responses.cancel()
