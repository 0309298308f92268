"""SmolLM2-135M-Instruct behind Triton's Python backend: a decoupled model that streams text as it is generated.

execute() hands each request to a thread of its own and returns at once; the thread waits for a free
llama instance (a slot), sends one response per piece of text and ends with the final flag on every
path. The input/output contract is in gpu/models/README.md; generation rules are in generation.py.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from generation import (
    BadRequest,
    Completion,
    Piece,
    PromptTooLong,
    Settings,
    Slots,
    Tokenizer,
    model_file,
    stream,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# How long finalize() waits for generation threads that were told to stop.
SHUTDOWN_JOIN_S = 5.0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("this model streams: set model_transaction_policy { decoupled: true }")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.settings = Settings.from_parameters(parameters, os.environ)
        self.slots = Slots(self.settings, model_file())
        self.tokenizer = Tokenizer(model_file())
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads: set[threading.Thread] = set()
        self.waiting = 0
        self.metrics = _Metrics({"model": args["model_name"], "version": args["model_version"]})
        self.metrics.slots.set(self.settings.slots)
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.settings.slots} slots x {self.settings.threads} threads, "
            f"context {self.settings.context}, gpu_layers {self.settings.gpu_layers}"
        )

    def execute(self, requests: list[Any]) -> None:
        # Inputs are read and checked here: a bad request is answered at once, threads hold plain values.
        for request in requests:
            sender = _Sender(request.get_response_sender())
            try:
                completion = _completion(request, self.settings.context)
                count_only = bool(_single(request, "count_prompt"))
            except BadRequest as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            if count_only:  # no slot: answered while every slot may be generating
                thread = threading.Thread(target=self._count, args=(sender, completion), name="count", daemon=True)
            else:
                thread = threading.Thread(target=self._serve, args=(sender, completion), name="generate", daemon=True)
            with self.lock:
                self.threads.add(thread)
            thread.start()

    def finalize(self) -> None:
        self.stopping.set()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(SHUTDOWN_JOIN_S)
        self.slots.close()
        self.tokenizer.close()
        self.metrics.close()

    def _serve(self, sender: Any, completion: Completion) -> None:
        try:
            self._generate(sender, completion)
        except Exception as exc:
            pb_utils.Logger.log_error(f"request failed: {exc!r}")
            _send_quietly(sender, _error("internal error while generating", pb_utils.TritonError.INTERNAL))
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())

    def _count(self, sender: Any, completion: Completion) -> None:
        """`count_prompt`: one final response with the prompt's length (finish_reason "counted"), or the error
        a generation would have given it (PROMPT_TOO_LONG, a prompt that fills the context)."""
        try:
            try:
                tokens = self.tokenizer.prompt_tokens(completion, self.settings.context)
                response = _response(Piece("", "counted", len(tokens), 0))
            except (BadRequest, PromptTooLong) as exc:
                response = _error(str(exc))
            except Exception as exc:
                pb_utils.Logger.log_error(f"counting failed: {exc!r}")
                response = _error("internal error while counting", pb_utils.TritonError.INTERNAL)
            _send_quietly(sender, response)
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())

    def _generate(self, sender: Any, completion: Completion) -> None:
        def stopped() -> str:
            if self.stopping.is_set():
                return "error"
            return "cancelled" if sender.is_cancelled() else ""

        # The prompt is tokenized on the shared vocabulary before a slot is taken: a bad or over-long one is
        # refused at once, and one within what the caller paid for is accepted at once, even while every slot
        # is busy, so the platform records the job while this request waits for a slot and does its prefill.
        try:
            tokens = self.tokenizer.prompt_tokens(completion, self.settings.context)
        except (BadRequest, PromptTooLong) as exc:
            sender.send(_error(str(exc)), flags=FINAL)
            return
        # The accepted response, until it is sent (only when the caller set what it paid for).
        accepted = _response(Piece("", "", len(tokens), 0)) if completion.max_prompt_tokens is not None else None
        accepting: threading.Thread | None = None
        llama = self.slots.try_acquire()
        if llama is None:  # every slot is busy: accept now (the send's time is waiting time), then wait
            self._count_waiting(+1)  # first: a caller that has the accepted response sees this request wait
            try:
                if accepted is not None:
                    _send_quietly(sender, accepted, flags=0)
                    accepted = None
                llama = self.slots.acquire(give_up=lambda: bool(stopped()))
            finally:
                self._count_waiting(-1)
            if llama is None:
                self._finish(sender, Piece("", stopped() or "cancelled", 0, 0))
                return
        self._count_busy()
        last = Piece("", "error", 0, 0)
        try:
            if accepted is not None:
                # A free slot: the accepted response goes out while the prefill runs. Sending costs ~20 ms on
                # this stub, so it goes from a thread of its own; the first piece waits for it (responses stay
                # in order, and never two sends at once on one request).
                accepting = threading.Thread(target=sender.send, args=(accepted,), name="accept", daemon=True)
                accepting.start()
            for piece in stream(llama, completion, tokens, self.settings.context, stopped):
                if accepting is not None:
                    accepting.join()
                    accepting = None
                last = piece
                if piece.finish_reason:
                    break
                sender.send(_response(piece))
            if accepting is not None:
                accepting.join()
            self._finish(sender, last)
        except Exception as exc:
            if accepting is not None:  # never two sends at once on one request
                accepting.join()
            # A send refused because the client cancelled meanwhile is a cancellation, not a failure.
            reason = stopped() or "error"
            if reason == "error":
                pb_utils.Logger.log_error(f"generation failed after {last.completion_tokens} tokens: {exc!r}")
            self._finish(sender, Piece("", reason, last.prompt_tokens, last.completion_tokens))
        finally:
            self.slots.release(llama)
            self._count_busy()

    def _finish(self, sender: Any, piece: Piece) -> None:
        """The counters that describe the finished request, then its last response (final flag): a client
        that has the last response sees them counted."""
        self.metrics.finished[piece.finish_reason].increment(1)
        self.metrics.prompt_tokens.increment(piece.prompt_tokens)
        self.metrics.completion_tokens.increment(piece.completion_tokens)
        _send_quietly(sender, _response(piece), flags=FINAL)

    def _count_waiting(self, delta: int) -> None:
        with self.lock:
            self.waiting += delta
            self.metrics.waiting.set(self.waiting)

    def _count_busy(self) -> None:
        with self.lock:
            self.metrics.busy.set(self.slots.busy())


# The stub's IPC with the server is not safe for concurrent calls from several threads: under 16 concurrent
# streams tritonserver 2.51 crashed (SIGSEGV, boost::interprocess::lock_exception) without this lock around
# every pb_utils call a worker thread makes (sends, is_cancelled, metric updates); with it, none did.
IPC = threading.Lock()


class _Sender:
    """A response sender whose calls hold IPC."""

    def __init__(self, sender: Any) -> None:
        self._sender = sender

    def send(self, response: Any = None, flags: int = 0) -> None:
        with IPC:
            if response is None:
                self._sender.send(flags=flags)
            else:
                self._sender.send(response, flags=flags)

    def is_cancelled(self) -> bool:
        with IPC:
            return bool(self._sender.is_cancelled())


class _Metric:
    """A custom metric whose updates hold IPC."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric

    def set(self, value: float) -> None:
        with IPC:
            self._metric.set(value)

    def increment(self, value: float) -> None:
        with IPC:
            self._metric.increment(value)


class _Metrics:
    """Custom metrics on Triton's /metrics endpoint: how full the slots are, and what finished how.

    The backend wants every Metric gone before its MetricFamily, so the families are kept here and
    dropped last, in close().
    """

    def __init__(self, labels: dict[str, str]) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._families: list[Any] = []

        def metric(name: str, description: str, kind: Any, extra: dict[str, str] | None = None) -> Any:
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(family)
            return _Metric(family.Metric({**labels, **(extra or {})}))

        self.slots = metric("far_llm_slots", "llama instances that can generate at once", gauge)
        self.busy = metric("far_llm_slots_busy", "slots generating now", gauge)
        self.waiting = metric("far_llm_requests_waiting", "requests waiting for a free slot", gauge)
        self.prompt_tokens = metric("far_llm_prompt_tokens_total", "prompt tokens of finished requests", counter)
        self.completion_tokens = metric(
            "far_llm_completion_tokens_total", "tokens generated by finished requests", counter
        )
        finished = pb_utils.MetricFamily(
            name="far_llm_requests_finished_total", description="finished requests by finish reason", kind=counter
        )
        self._families.append(finished)
        self.finished = {
            reason: _Metric(finished.Metric({**labels, "finish_reason": reason})) for reason in FINISH_REASONS
        }

    def close(self) -> None:
        for name in ("slots", "busy", "waiting", "prompt_tokens", "completion_tokens", "finished"):
            delattr(self, name)
        self._families.clear()


def _completion(request: Any, context: int) -> Completion:
    return Completion.parse(
        prompt=_text(request, "prompt"),
        messages=_text(request, "messages"),
        max_tokens=_number(request, "max_tokens", int),
        max_prompt_tokens=_number(request, "max_prompt_tokens", int),
        temperature=_number(request, "temperature", float),
        top_p=_number(request, "top_p", float),
        stop=[_decode("stop", value) for value in _values(request, "stop")],
        seed=_number(request, "seed", int),
        context=context,
    )


def _values(request: Any, name: str) -> list[Any]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return [] if tensor is None else list(tensor.as_numpy().reshape(-1))


def _single(request: Any, name: str) -> Any:
    values = _values(request, name)
    if len(values) > 1:
        raise BadRequest(f"'{name}' takes one value, got {len(values)}")
    return values[0] if values else None


def _decode(name: str, value: Any) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise BadRequest(f"'{name}' is not UTF-8") from None


def _text(request: Any, name: str) -> str | None:
    value = _single(request, name)
    return None if value is None else _decode(name, value)


def _number(request: Any, name: str, kind: type[int] | type[float]) -> Any:
    value = _single(request, name)
    return None if value is None else kind(value)


def _response(piece: Piece) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text", np.array([piece.text.encode()], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([piece.finish_reason.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([piece.prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([piece.completion_tokens], dtype=np.int32)),
        ]
    )


def _error(message: str, code: Any = None) -> Any:
    """An error response; INVALID_ARG unless `code` says otherwise."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code or pb_utils.TritonError.INVALID_ARG))


def _send_quietly(sender: Any, response: Any, flags: int = FINAL) -> None:
    """Send the last response of a request whose client may be gone (a cancelled stream refuses sends)."""
    try:
        sender.send(response, flags=flags)
    except Exception as exc:
        pb_utils.Logger.log_verbose(f"final response not delivered: {exc!r}")
