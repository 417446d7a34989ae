"""A fake `AsyncBatonEngine` with exactly the real front's interface, for Serve tests where the model is
not the point.

Tokens are characters (`token id = ord(char)`). A request "generates" its prompt again, one character per
iteration, then stops on EOS (id 0) unless `ignore_eos`; with `ignore_eos` it keeps cycling through the
prompt until `max_tokens`. So completing "abc" gives "abc" (finish "stop"), or "ab" with max_tokens=2
(finish "length"). With `logprobs=k`, token t has logprob log(1/2) and alternatives t, t+1, ... with
logprobs log(1/2), log(1/4), ... (k of them). With n choices, choice i generates the prompt rotated by i
characters ("abc": "abc", "bca", "cab"), its tokens' logprob log(1/2) / (1 + i) (so later choices rank
higher for best_of). With `prompt_logprobs=k` the prompt's tokens after the first get log(1/2) and the same
alternatives, on each choice's first output. The loop runs in its own daemon thread, like the real engine's,
and holds at most `max_batch_size` rows; the rest wait by (priority, arrival). Streams, aborts and the failure of every open
stream when the loop dies are the real front's (engine/streams.py), so Serve tests exercise them.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from configs import EngineConfig
from configs.errors import FieldError
from configs.knobs import with_live_knobs
from engine.choices import Resume, choice_id, choices_to_run
from engine.request import RequestOutput, SamplingParams, TokenLogprobs, Usage
from engine.streams import OpenStreams, RequestStream, StreamSink

EOS_TOKEN_ID = 0


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
    output_id: str = ""  # the id its outputs carry (the submitted request's)
    index: int = 0  # which choice
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (stop strings cut off)
    emitted: int = 0  # how much of `text` has been streamed
    finished: bool = False


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
        self, config: EngineConfig, step_delay_s: float = 0.005, crash_on_prompt: str | None = None,
        refuse_start_if: str | None = None, submissions_dir: str | None = None,
    ) -> None:
        self._config = config
        self._step_delay_s = step_delay_s
        self._crash_on_prompt = crash_on_prompt
        self._refuse_start_if = refuse_start_if
        self._submissions_dir = submissions_dir  # test hook: one file per request submitted here, "<pid>-<id>"
        self.engine = _FakeCore(config.max_model_len or 2048)
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, int, str]] = []  # heap of (priority, arrival, request_id)
        self._requests: dict[str, _FakeRequest] = {}
        self._running: list[str] = []
        self._streams = OpenStreams()
        # Aborts arrive like the real front's: through a reentrant queue (a finalizer may post them).
        self._aborts: queue.SimpleQueue[tuple[str, StreamSink | None, Callable[[], object] | None]] = (
            queue.SimpleQueue()
        )
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._crash = threading.Event()
        self._dead = False
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
        if self._refuse_start_if is not None and os.path.exists(self._refuse_start_if):
            raise RuntimeError(f"test hook: {self._refuse_start_if} exists, so this engine does not start")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fake-baton-loop", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def crash(self) -> None:
        """Test hook: make an exception escape the loop thread; like the real front's, the dying loop ends
        every open stream with an error output."""
        self._crash.set()

    # -- requests --------------------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        sampling_params: SamplingParams | None = None,
        priority: int = 0,
        on_close: Callable[[], None] | None = None,
        resume_token_ids: Resume = (),
        n: int = 1,
    ) -> RequestStream:
        params = sampling_params or SamplingParams()
        if (prompt is None) == (prompt_token_ids is None):
            raise FieldError("prompt", "exactly one of prompt or prompt_token_ids must be given")
        ids = self.engine.tokenizer.encode(prompt) if prompt is not None else list(prompt_token_ids or [])
        if not ids:
            raise FieldError("prompt", "prompt must not be empty")
        vocab = self.engine.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise FieldError("prompt_token_ids", f"prompt_token_ids {bad[:5]} outside the vocabulary [0, {vocab})")
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise FieldError("stop_token_ids", f"stop_token_ids {bad_stop} outside the vocabulary (size {vocab})")
        params.check_vocabulary(vocab)  # logit_bias ids, as the real engine checks them
        if self._crash_on_prompt is not None and self.engine.tokenizer.decode(ids) == self._crash_on_prompt:
            self.crash()
        if len(ids) + params.max_tokens > self.engine.max_model_len:
            raise FieldError(
                "prompt",
                # Deliberately not starting with the field's name: the 400's `param` comes from FieldError.
                f"this request needs {len(ids)} prompt tokens + max_tokens ({params.max_tokens}), more than "
                f"max_model_len ({self.engine.max_model_len})",
            )
        requests = []
        for i, resumed in choices_to_run(n, resume_token_ids).items():
            request = _FakeRequest(choice_id(request_id, i), ids, params, priority, request_id, i)
            for token in resumed:  # a continuation: as if these had been generated and streamed here
                request.output_ids.append(token)
                request.text += chr(token)
                request.emitted = len(request.text) - _held(request)
            requests.append(request)

        if self._submissions_dir is not None:
            open(os.path.join(self._submissions_dir, f"{os.getpid()}-{request_id}"), "w").close()

        def queue_it() -> None:
            with self._lock:
                for r in requests:
                    self._requests[r.request_id] = r
                    heapq.heappush(self._waiting, (priority, next(self._arrivals), r.request_id))
                self._prompt_tokens += len(ids)

        return self._streams.open(request_id, self._abort, on_close, then=queue_it,
                                  choices=tuple(r.index for r in requests))

    def abort(self, request_id: str) -> None:
        self._abort(request_id, None, None)

    def _abort(self, request_id: str, sink: StreamSink | None, on_dropped: Callable[[], object] | None) -> None:
        self._aborts.put((request_id, sink, on_dropped))
        if self._streams.closed:
            self._take_aborts()

    # -- knobs and metrics -----------------------------------------------------------------------------

    def update_controller(self, **knobs: Any) -> None:
        self._config = with_live_knobs(self._config, knobs)  # FieldError naming the knob

    def metrics(self) -> dict[str, float]:
        with self._lock:
            running = len(self._running)
            waiting = len(self._waiting)
            cached = sum(len(r.prompt_ids) + len(r.output_ids) for r in self._requests.values())
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
            "kv_cache_usage": min(1.0, cached / (cap * self.engine.max_model_len)),
            "admissions_refused_for_memory": 0.0,
            "iterations": float(self._iterations),
            "decode_threads": 1.0,  # no threads of its own
            "thread_switches_total": 0.0,
            "decode_rows_total": float(self._generated),  # a row per generated token
            "forward_seconds_total": 0.0,
            "iteration_seconds_total": 0.0,
            "generated_tokens_total": float(self._generated),
            "prompt_tokens_total": float(self._prompt_tokens),
            "prefix_cache_hit_tokens_total": 0.0,  # no prefix cache
            "prefix_cache_query_tokens_total": 0.0,
            "prefix_cache_bytes": 0.0,
            "share_job_seconds_total": 0.0,  # no kernels, no work-sharing pool
            "share_wait_seconds_total": 0.0,
            "share_stalls_total": 0.0,
        }

    # -- the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        reason = "the engine loop stopped"
        try:
            while not self._stop.is_set():
                if self._crash.is_set():
                    raise RuntimeError("injected crash of the fake engine loop")
                aborted, dropped = self._take_aborts()
                self._step(aborted)
                for on_dropped in dropped:
                    on_dropped()
                time.sleep(self._step_delay_s)
        except RuntimeError as e:
            reason = f"the engine loop died: {e}"
        else:
            reason = "the engine was shut down"
        finally:
            self._dead = True
            self._streams.close(reason)
            self._take_aborts()

    def _take_aborts(self) -> tuple[set[str], list[Callable[[], object]]]:
        """The ids to abort (still held by the stream that asked) and the callbacks to run after; once the
        loop has ended, the callbacks run at once."""
        aborted: set[str] = set()
        dropped: list[Callable[[], object]] = []
        while True:
            try:
                rid, sink, on_dropped = self._aborts.get_nowait()
            except queue.Empty:
                break
            if sink is None or self._streams.holds(rid, sink):
                aborted.add(rid)
            if on_dropped is not None:
                dropped.append(on_dropped)
        if self._streams.closed:
            for on_dropped in dropped:
                on_dropped()
            dropped = []
        return aborted, dropped

    def _step(self, aborted: set[str]) -> None:
        with self._lock:
            outputs: list[RequestOutput] = []
            for rid in [r.request_id for r in self._requests.values() if r.output_id in aborted]:
                req = self._requests.pop(rid)
                if rid in self._running:
                    self._running.remove(rid)
                self._waiting = [w for w in self._waiting if w[2] != rid]
                heapq.heapify(self._waiting)
                outputs.append(self._final(req, "abort"))
            while self._waiting and len(self._running) < self._config.max_batch_size:
                _, _, rid = heapq.heappop(self._waiting)
                self._running.append(rid)
            if self._running:
                self._iterations += 1
            for rid in list(self._running):
                req = self._requests[rid]
                outputs.append(self._decode_one(req))
                if req.finished:
                    self._running.remove(rid)
                    del self._requests[rid]
        self._streams.deliver(outputs)

    def _decode_one(self, req: _FakeRequest) -> RequestOutput:
        i = len(req.output_ids)
        token = req.prompt_ids[(i + req.index) % len(req.prompt_ids)]
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
        return RequestOutput(req.output_id, [token], self._flush(req, len(req.text) - _held(req)),
                             logprobs=_logprobs(req, [token]), prompt_logprobs=_prompt_logprobs(req), index=req.index)

    @staticmethod
    def _flush(req: _FakeRequest, upto: int) -> str:
        delta = req.text[req.emitted : upto]
        req.emitted = max(req.emitted, upto)
        return delta

    def _final(self, req: _FakeRequest, reason: str, delta: str = "") -> RequestOutput:
        req.finished = True
        new = [req.output_ids[-1]] if req.output_ids and reason != "abort" else []
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids))
        return RequestOutput(req.output_id, new, delta, True, reason, usage,  # type: ignore[arg-type]
                             logprobs=_logprobs(req, new), prompt_logprobs=_prompt_logprobs(req) if new else None,
                             index=req.index)


def _held(req: _FakeRequest) -> int:
    """How much of the text's tail may be the start of a stop string (held back, not streamed yet)."""
    return max((k for s in req.params.stop for k in range(1, len(s)) if req.text.endswith(s[:k])), default=0)


def _logprobs(req: _FakeRequest, tokens: list[int]) -> list[TokenLogprobs] | None:
    """The fake's logprobs (see the module docstring): a halving distribution from the token up."""
    k = req.params.logprobs
    if k is None:
        return None
    return _halving(tokens, k, math.log(0.5) / (1 + req.index))


def _halving(tokens: list[int], top: int, logprob: float) -> list[TokenLogprobs]:
    half = math.log(0.5)
    return [TokenLogprobs(t, logprob, tuple((t + i, half * (i + 1)) for i in range(top))) for t in tokens]


def _prompt_logprobs(req: _FakeRequest) -> list[TokenLogprobs | None] | None:
    """With the first token drawn here (not a continuation's), the prompt logprobs when asked (every choice's
    the same)."""
    top = req.params.prompt_logprobs
    if top is None or len(req.output_ids) != 1:
        return None
    return [None, *_halving(req.prompt_ids[1:], top, math.log(0.5))]
