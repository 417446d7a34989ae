"""A fake `AsyncBatonEngine` with exactly the real front's interface, for Serve tests where the model is
not the point.

Tokens are characters (`token id = ord(char)`). A request "generates" its prompt again, one character per
iteration, then stops on EOS (id 0) unless `ignore_eos`; with `ignore_eos` it keeps cycling through the
prompt until `max_tokens`. So completing "abc" gives "abc" (finish "stop"), or "ab" with max_tokens=2
(finish "length"). The loop runs in its own daemon thread, like the real engine's, and holds at most
`max_batch_size` rows; the rest wait by (priority, arrival).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from configs import EngineConfig
from engine.request import RequestOutput, SamplingParams, Usage

EOS_TOKEN_ID = 0
_LIVE_KNOBS_CONTROLLER = ("high_watermark", "low_watermark", "preemption_mode")
_LIVE_KNOBS_ENGINE = ("max_batch_size", "prefill_token_budget")


class FakeTokenizer:
    """One token per character; a chat template in the ChatML style. Like the Hugging Face fast tokenizer,
    it raises TypeError on text that is not valid Unicode (a lone UTF-16 surrogate)."""

    eos_token_id = EOS_TOKEN_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(
                "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
            ) from None
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i != EOS_TOKEN_ID)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text) if tokenize else text


@dataclass
class _FakeRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (stop strings cut off)
    emitted: int = 0  # how much of `text` has been streamed
    finished: bool = False


class FakeStream:
    """The async iterator `submit` returns: engine deltas, the last one `finished`."""

    def __init__(self, front: FakeAsyncEngine, request: _FakeRequest) -> None:
        self._front = front
        self._request = request
        self._done = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._request.queue.get()
        except asyncio.CancelledError:
            self._front.abort(self._request.request_id)
            raise
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._front.abort(self._request.request_id)


class _FakeCore:
    """What `front.engine` exposes: the tokenizer and the context limit. The vocabulary is the code points
    below the surrogates, so every token decodes to valid text, as a real tokenizer's do."""

    vocab_size = 0xD800

    def __init__(self, max_model_len: int) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len


class FakeAsyncEngine:
    """Stand-in for `engine.AsyncBatonEngine` (same constructor, methods and metrics keys)."""

    def __init__(
        self, config: EngineConfig, step_delay_s: float = 0.005, crash_on_prompt: str | None = None
    ) -> None:
        self._config = config
        self._step_delay_s = step_delay_s
        self._crash_on_prompt = crash_on_prompt
        self.engine = _FakeCore(config.max_model_len or 2048)
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, int, str]] = []  # heap of (priority, arrival, request_id)
        self._requests: dict[str, _FakeRequest] = {}
        self._running: list[str] = []
        self._aborted: set[str] = set()
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._crash = threading.Event()
        self._iterations = 0
        self._generated = 0
        self._prompt_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> FakeAsyncEngine:
        return cls(config)

    @property
    def config(self) -> EngineConfig:
        return self._config

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fake-baton-loop", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def crash(self) -> None:
        """Test hook: make the loop thread die (without failing its requests: the server must notice)."""
        self._crash.set()

    # -- requests --------------------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
        priority: int = 0,
    ) -> FakeStream:
        params = sampling_params or SamplingParams()
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("exactly one of prompt or prompt_token_ids must be given")
        ids = self.engine.tokenizer.encode(prompt) if prompt is not None else list(prompt_token_ids or [])
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.engine.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids {bad[:5]} outside the vocabulary [0, {vocab})")
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop} outside the vocabulary (size {vocab})")
        if self._crash_on_prompt is not None and self.engine.tokenizer.decode(ids) == self._crash_on_prompt:
            self.crash()
        if len(ids) + params.max_tokens > self.engine.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"({self.engine.max_model_len})"
            )
        loop = asyncio.get_running_loop()
        request = _FakeRequest(request_id, ids, params, priority, loop, asyncio.Queue())
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._requests[request_id] = request
            heapq.heappush(self._waiting, (priority, next(self._arrivals), request_id))
            self._prompt_tokens += len(ids)
        return FakeStream(self, request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._requests:
                self._aborted.add(request_id)

    # -- knobs and metrics -----------------------------------------------------------------------------

    def update_controller(self, **knobs: Any) -> None:
        unknown = set(knobs) - set(_LIVE_KNOBS_CONTROLLER) - set(_LIVE_KNOBS_ENGINE)
        if unknown:
            raise ValueError(f"unknown controller knob(s) {sorted(unknown)}")
        controller = self._config.controller.model_dump()
        engine = self._config.model_dump()
        for k, v in knobs.items():
            if k in _LIVE_KNOBS_CONTROLLER:
                controller[k] = v
            else:
                engine[k] = v
        engine["controller"] = controller
        self._config = EngineConfig.model_validate(engine)  # raises ValidationError (a ValueError)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            running = len(self._running)
            waiting = len(self._waiting)
        cap = float(self._config.max_batch_size)
        return {
            "num_requests_running": float(running),
            "num_requests_waiting": float(waiting),
            "num_requests_swapped": 0.0,
            "capacity": cap,
            "max_batch_size": cap,
            "preemptions_total": 0.0,
            "idle_fraction": 0.0,
            "memory_used_fraction": running / cap,
            "admissions_refused_for_memory": 0.0,
            "iterations": float(self._iterations),
            "generated_tokens_total": float(self._generated),
            "prompt_tokens_total": float(self._prompt_tokens),
        }

    # -- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._crash.is_set():
                return  # the loop thread ends, as the real one does after repeated failures
            self._step()
            time.sleep(self._step_delay_s)

    def _step(self) -> None:
        with self._lock:
            outputs: list[tuple[_FakeRequest, RequestOutput]] = []
            for rid in list(self._aborted):
                self._aborted.discard(rid)
                req = self._requests.pop(rid, None)
                if req is None:
                    continue
                if rid in self._running:
                    self._running.remove(rid)
                self._waiting = [w for w in self._waiting if w[2] != rid]
                heapq.heapify(self._waiting)
                outputs.append((req, self._final(req, "abort")))
            while self._waiting and len(self._running) < self._config.max_batch_size:
                _, _, rid = heapq.heappop(self._waiting)
                self._running.append(rid)
            if self._running:
                self._iterations += 1
            for rid in list(self._running):
                req = self._requests[rid]
                outputs.append((req, self._decode_one(req)))
                if req.finished:
                    self._running.remove(rid)
                    del self._requests[rid]
        for req, out in outputs:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, out)

    def _decode_one(self, req: _FakeRequest) -> RequestOutput:
        i = len(req.output_ids)
        token = req.prompt_ids[i % len(req.prompt_ids)]
        if i >= len(req.prompt_ids) and not req.params.ignore_eos:
            token = EOS_TOKEN_ID
        req.output_ids.append(token)
        self._generated += 1
        if token == EOS_TOKEN_ID or token in req.params.stop_token_ids:
            return self._final(req, "stop", self._flush(req, len(req.text)))
        req.text += chr(token)
        for stop in req.params.stop:
            at = req.text.find(stop)
            if at >= 0:
                req.text = req.text[:at]
                return self._final(req, "stop", self._flush(req, len(req.text)))
        if len(req.output_ids) >= req.params.max_tokens:
            return self._final(req, "length", self._flush(req, len(req.text)))
        # Hold back a tail that may be the start of a stop string: it must never be streamed.
        held = max(
            (k for s in req.params.stop for k in range(1, len(s)) if req.text.endswith(s[:k])), default=0
        )
        return RequestOutput(req.request_id, [token], self._flush(req, len(req.text) - held))

    @staticmethod
    def _flush(req: _FakeRequest, upto: int) -> str:
        delta = req.text[req.emitted : upto]
        req.emitted = max(req.emitted, upto)
        return delta

    def _final(self, req: _FakeRequest, reason: str, delta: str = "") -> RequestOutput:
        req.finished = True
        new = [req.output_ids[-1]] if req.output_ids and reason != "abort" else []
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids))
        return RequestOutput(req.request_id, new, delta, True, reason, usage)  # type: ignore[arg-type]
