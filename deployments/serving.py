"""OpenAI serving over an engine front: one code path for HTTP and Python handles.

A typed request becomes an engine request (prompt, `SamplingParams`, priority); the engine's deltas become
a typed response or typed stream chunks. Every client mistake is an `OpenAIError` (400/404) raised
*before* anything is streamed, so a streaming request that cannot run still gets a proper status code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from configs.errors import FieldError
from configs.serve import ServerConfig
from deployments import errors
from deployments.choices import ChoiceOutputs, summed_usage
from deployments.echo import Echo
from deployments.front import GenerationBackend, RequestStream
from deployments.logprobs import LogprobsShaper
from deployments.protocol import (
    CONSTRAINT_PARAMS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    StreamChunk,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    new_id,
    now,
)
from engine.request import RequestOutput, SamplingParams, TokenLogprobs, Usage

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class EngineRequest:
    """What the engine is asked to do for one API request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    priority: int
    n: int = 1  # choices to generate (engine/choices.py): `n`, or `best_of` when it is larger


class Admission:
    """The replica's own queue limit: how many requests it holds at once (`ServerConfig.max_pending_requests`).

    Enforced here, before the engine, so the client gets an OpenAI-shaped 429 with Retry-After (Ray's proxy
    answers its own plain-text 429/503 only past `max_ongoing_requests` + `max_queued_requests`). A request
    with n choices takes n slots: each choice is a sequence of its own in the engine (a row, a KV copy), as
    vLLM counts each against its sequence limit; one that could never fit is a 400 naming `n`.
    """

    def __init__(self, limit: int | None, retry_after_s: int) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self.refused = 0
        # Reentrant: a release may come from a garbage collector's finalizer (a stream dropped unconsumed),
        # which can run on this very thread while it holds the lock.
        self._lock = threading.RLock()

    def acquire(self, slots: int = 1, param: str = "n") -> Callable[[], None]:
        """Take `slots` slots (a request's choices) or raise a 429 (a 400 naming `param` when they exceed the
        limit itself); returns the slots' release (idempotent)."""
        if self.limit is not None and slots > self.limit:
            raise errors.bad_request(f"{param}: {slots} choices are more than this server holds at once "
                                     f"({self.limit}, max_pending_requests)", param)
        with self._lock:
            if self.limit is not None and self.in_flight + slots > self.limit:
                self.refused += 1
                raise errors.overloaded(self.limit, self.retry_after_s)
            self.in_flight += slots
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self.in_flight -= slots

        return release


@dataclass(frozen=True)
class RequestTiming:
    """Latencies of one finished request, for the metrics."""

    ttft_s: float | None  # submit -> first generated token
    tpot_s: float | None  # mean time per output token after the first
    e2e_s: float
    finish_reason: str


class Generation:
    """One request running in the engine: its deltas and its timing.

    The request's stream owns its end: leaving `outputs()` early, cancelling the task that reads it, or
    dropping the generation unconsumed aborts the request through the front, and the stream's `on_close`
    (the admission slot's release) runs exactly once on every path, the normal end included. A request whose
    engine loop dies gets an error output from the front, so reading never waits forever. With `timeout_s`,
    a request still running when it passes is aborted and ends as if it had reached its length limit
    (finish_reason 'length'), with `warning` set. A request with `choices` > 1 streams each choice's outputs
    (`RequestOutput.index`); it is finished once every choice is.
    """

    def __init__(
        self,
        front: GenerationBackend,
        request_id: str,
        stream: RequestStream,
        on_finish: Callable[[RequestTiming], None],
        on_first_token: Callable[[float], None],
        prompt_tokens: int = 0,
        timeout_s: float | None = None,
        choices: int = 1,
        echo: Echo | None = None,
    ) -> None:
        self.request_id = request_id
        self.choices = choices
        self.echo = echo  # completions' echo (each choice's): what the outputs become before they are shaped
        self._prompt_tokens = prompt_tokens
        self._timeout_s = timeout_s
        self.warning: str | None = None
        self._front = front
        self._stream = stream
        self._on_finish = on_finish
        self._on_first_token = on_first_token
        self._t_submit = time.monotonic()
        self._t_first: float | None = None
        self._num_tokens = 0
        self._tokens_by_choice = [0] * choices
        self._unfinished = set(range(choices))
        self.finished = False
        self._engine_done = False  # the engine's own final outputs arrived

    async def outputs(self) -> AsyncGenerator[RequestOutput, None]:
        """The engine's deltas; the last one is `finished`. Leaving early aborts the request."""
        try:
            it = self._stream.__aiter__()
            while not self.finished:
                try:
                    out = await self._next(it)
                except StopAsyncIteration:
                    raise errors.engine_unavailable("the engine ended the stream without a final output") from None
                except TimeoutError:
                    for cut in self._cut_short():
                        self._observe(cut)
                        yield cut
                    return
                self._observe(out)
                self._engine_done = self.finished
                yield out
        finally:
            if not self._engine_done:
                await self._stream.aclose()

    async def _next(self, it: AsyncIterator[RequestOutput]) -> RequestOutput:
        if self._timeout_s is None:
            return await it.__anext__()
        left = self._t_submit + self._timeout_s - time.monotonic()
        return await asyncio.wait_for(it.__anext__(), max(0.0, left))

    def _cut_short(self) -> list[RequestOutput]:
        """The final output of each unfinished choice of a request whose deadline passed (the engine's request
        is aborted after them)."""
        self.warning = (f"the request's deadline ({self._timeout_s:g} s) passed: the output is cut short "
                        "(finish_reason 'length')")
        return [RequestOutput(self.request_id, [], "", finished=True, finish_reason="length",
                              usage=Usage(self._prompt_tokens, self._tokens_by_choice[i]), index=i)
                for i in sorted(self._unfinished)]

    def finish_reason(self, out: RequestOutput) -> FinishReason:
        """The OpenAI finish reason of a final output; engine-side failures become 5xx errors: 503 when the
        engine loop has died under the request (another replica can serve it), else 500."""
        if out.finish_reason == "error" and not self._front.is_healthy():
            raise errors.engine_unavailable(f"the engine loop died while this request was running: {out.error}")
        return _finish_reason(out)

    def _observe(self, out: RequestOutput) -> None:
        t = time.monotonic()
        if out.new_token_ids:
            if self._t_first is None:
                self._t_first = t
                self._on_first_token(t - self._t_submit)
            self._num_tokens += len(out.new_token_ids)
            self._tokens_by_choice[out.index] += len(out.new_token_ids)
        if out.finished:
            self._unfinished.discard(out.index)
        if out.finished and not self._unfinished:
            self.finished = True
            ttft = None if self._t_first is None else self._t_first - self._t_submit
            tpot = (
                (t - self._t_first) / (self._num_tokens - 1)
                if self._t_first and self._num_tokens > 1
                else None
            )
            self._on_finish(RequestTiming(ttft, tpot, t - self._t_submit, out.finish_reason or "unknown"))
            log.info("request %s finished: %s, %d tokens in %.3f s", self.request_id, out.finish_reason,
                     self._num_tokens, t - self._t_submit)


def _finish_reason(out: RequestOutput) -> FinishReason:
    """The OpenAI finish reason of a final output; engine-side failures become 5xx errors."""
    if out.finish_reason == "stop":
        return "stop"
    if out.finish_reason == "length":
        return "length"
    if out.finish_reason == "error":
        raise errors.engine_failed(f"the engine failed this request: {out.error or 'unknown error'}")
    raise errors.engine_unavailable(
        f"the request was aborted by the engine (finish_reason={out.finish_reason!r})"
    )


def _bytes_per_token(tokenizer: object) -> int:
    """The most UTF-8 bytes any vocabulary entry spells (0 when the tokenizer has no `get_vocab`)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return 0
    return max((len(str(t).encode("utf-8", errors="surrogatepass")) for t in get_vocab()), default=0)


def _from_value_error(e: ValueError, default_param: str | None = None) -> errors.OpenAIError:
    """`errors.from_value_error`, naming the request field a structured-output constraint came from."""
    err = errors.from_value_error(e, default_param)
    err.param = CONSTRAINT_PARAMS.get(err.param or "", err.param)
    return err


def _prompt_param(request: GenerateRequest) -> str:
    """The request field a prompt-related error names."""
    return "messages" if isinstance(request, ChatCompletionRequest) else "prompt"


def _engine_logprobs(request: GenerateRequest) -> int | None:
    """The logprobs the engine computes: what the client asked for; with `best_of` ranking more choices than
    it returns, at least the sampled tokens' own (the ranking's cumulative logprob), even if not shown."""
    asked = request.logprobs_count()
    if asked is None and request.choices_to_generate() > request.n:
        return 0
    return asked


class OpenAIServing:
    """Completions and chat completions over one engine front (no HTTP or Ray in here)."""

    def __init__(
        self,
        front: GenerationBackend,
        config: ServerConfig,
        on_finish: Callable[[RequestTiming], None] = lambda timing: None,
        on_first_token: Callable[[float], None] = lambda ttft_s: None,
    ) -> None:
        self._front = front
        self._config = config
        self._on_finish = on_finish
        self._on_first_token = on_first_token
        self._created = now()
        engine_model = front.config.model
        self.model_name = config.model_name_for(engine_model)
        self._accepted_names = {self.model_name, engine_model}
        self.admission = Admission(config.max_pending_requests, config.retry_after_s)
        self._bytes_per_token: int | None = None  # computed from the vocabulary on the first long prompt

    # -- models ----------------------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card(self.model_name)])

    def model_card(self, model_id: str) -> ModelCard:
        self.check_model(model_id)
        return ModelCard(
            id=self.model_name, created=self._created, max_model_len=self._front.engine.max_model_len
        )

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self._accepted_names:
            raise errors.model_not_found(model, [self.model_name])

    # -- the two entry points --------------------------------------------------------------------------

    @staticmethod
    def new_request_id(request: GenerateRequest) -> str:
        """A fresh id for a request the client did not name (OpenAI's prefixes)."""
        return new_id("chatcmpl" if isinstance(request, ChatCompletionRequest) else "cmpl")

    async def generate(self, request: GenerateRequest, request_id: str | None = None) -> GenerateResponse:
        """The whole result of a completion or chat request (its `stream` flag is ignored). `request_id`: the
        client's (X-Request-Id), used as the engine's id and the response's `id`; None: a fresh one."""
        gen = await self._submit(request, request_id or self.new_request_id(request))
        gathered = ChoiceOutputs()
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                gathered.add(gen.echo.apply(out) if gen.echo is not None else out)
        return self._response(request, gen, gathered)

    def _response(self, request: GenerateRequest, gen: Generation, gathered: ChoiceOutputs) -> GenerateResponse:
        """The whole response: the request's `n` choices (with `best_of`, the best `n` of those generated,
        renumbered best first), the usage of every choice generated."""
        wanted = request.logprobs_count() is not None
        tokenizer = self._front.engine.tokenizer
        kept = gathered.best(request.n)
        reasons = [gen.finish_reason(c.last) for c in kept if c.last is not None]
        assert len(reasons) == len(kept), "every choice has finished"
        if isinstance(request, ChatCompletionRequest):
            chat = [ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                               logprobs=LogprobsShaper(tokenizer).chat(c.logprobs) if wanted else None,
                               finish_reason=reason)
                    for i, (c, reason) in enumerate(zip(kept, reasons, strict=True))]
            return ChatCompletionResponse(
                id=gen.request_id, created=now(), model=self.model_name, choices=chat, usage=gathered.usage(),
                warning=gen.warning,
            )
        completion = [CompletionChoice(index=i, text="".join(c.text), finish_reason=reason,
                                       logprobs=self._completion_logprobs(gen, LogprobsShaper(tokenizer), wanted,
                                                                          c.logprobs, c.prompt_logprobs))
                      for i, (c, reason) in enumerate(zip(kept, reasons, strict=True))]
        return CompletionResponse(
            id=gen.request_id,
            created=now(),
            model=self.model_name,
            choices=completion,
            usage=gathered.usage(),
            warning=gen.warning,
        )

    @staticmethod
    def _completion_logprobs(gen: Generation, shaper: LogprobsShaper, wanted: bool,
                             generated: list[TokenLogprobs] | None,
                             prompt: list[TokenLogprobs | None] | None) -> CompletionLogprobs | None:
        """One choice's completion logprobs (of one chunk, or the whole choice), through its own `shaper`:
        with echo, the prompt's first (`Echo.shape`)."""
        if gen.echo is not None:
            return gen.echo.shape(shaper, generated, prompt)
        return shaper.completion(generated or []) if wanted else None

    async def generate_stream(
        self, request: GenerateRequest, request_id: str | None = None
    ) -> AsyncIterator[StreamChunk]:
        """Validate, tokenize and submit now (raising `OpenAIError`, so a refused stream still gets its status
        code), then return the stream of OpenAI chunks. `request_id` as for `generate`."""
        gen = await self._submit(request, request_id or self.new_request_id(request))
        if isinstance(request, ChatCompletionRequest):
            return self._chat_chunks(gen, request.include_usage_in_stream)
        return self._completion_chunks(gen, request.include_usage_in_stream)

    # -- request -> engine -----------------------------------------------------------------------------

    async def _submit(self, request: GenerateRequest, request_id: str) -> Generation:
        """Check the request, take an admission slot, tokenize off the event loop, hand it to the engine.

        Whatever ends this between taking the slot and handing it to the `Generation` (bad input, an engine
        error of any type, the caller cancelled while the prompt was being tokenized) gives the slot back.
        """
        self.check_model(request.model)
        self._check_priority(request.priority)
        if not self._front.is_healthy():
            raise errors.engine_unavailable("the engine is not running on this replica")
        release = self.admission.acquire(request.choices_to_generate(), request.choices_param())
        try:
            engine_request = await self._to_engine_request(request, request_id)
            stream = self._start(engine_request, _prompt_param(request), release)
            log.info("request %s: %d prompt tokens, max_tokens=%d, n=%d, priority=%d", request_id,
                     len(engine_request.prompt_token_ids or ()), engine_request.params.max_tokens, engine_request.n,
                     request.priority)
        except BaseException:
            release()  # idempotent: the stream, once started, releases on its own end
            raise
        return Generation(self._front, engine_request.request_id, stream, self._on_finish, self._on_first_token,
                          len(engine_request.prompt_token_ids or ()), self._timeout(request), engine_request.n,
                          await self._echo(request, engine_request))

    async def _echo(self, request: GenerateRequest, engine_request: EngineRequest) -> Echo | None:
        """A completion request's echo (None without): the prompt's text is the client's string, or the
        decoding of its token ids (vLLM's)."""
        if not isinstance(request, CompletionRequest) or not request.echo:
            return None
        ids = list(engine_request.prompt_token_ids or ())
        single = request.single_prompt()
        text = single if isinstance(single, str) else await asyncio.to_thread(self._decode, ids)
        return Echo(text, ids, generate=request.max_tokens != 0, logprobs=request.logprobs_count())

    def _timeout(self, request: GenerateRequest) -> float | None:
        """The request's deadline in seconds: its own `timeout`, capped by the server's `request_timeout_s`."""
        limits = [t for t in (request.timeout, self._config.request_timeout_s) if t is not None]
        return min(limits) if limits else None

    def _check_priority(self, priority: int) -> None:
        low, high = self._config.priority_min, self._config.priority_max
        if not low <= priority <= high:
            shown = str(priority) if len(str(priority)) <= 24 else f"an integer of {len(str(priority))} digits"
            raise errors.bad_request(f"priority must be in [{low}, {high}], got {shown}", "priority")

    def _start(self, engine_request: EngineRequest, param: str, release: Callable[[], None]) -> RequestStream:
        """Submit to the engine (the stream calls `release` when it ends); its refusals become OpenAI errors
        naming `param` for the prompt."""
        try:
            return self._front.submit(
                engine_request.request_id,
                prompt=engine_request.prompt,
                prompt_token_ids=engine_request.prompt_token_ids,
                sampling_params=engine_request.params,
                priority=engine_request.priority,
                on_close=release,
                n=engine_request.n,
            )
        except FieldError as e:
            if e.param == "request_id":  # a client's X-Request-Id that a running request holds
                raise errors.request_id_in_use(engine_request.request_id) from None
            raise self._prompt_error(e, param) from None
        except ValueError as e:
            raise self._prompt_error(e, param) from None
        except RuntimeError as e:  # the engine loop stopped between the health check and the submit
            raise errors.engine_unavailable(f"the engine is not running on this replica: {e}") from None
        except Exception as e:
            log.exception("the engine failed to accept request %s", engine_request.request_id)
            raise errors.engine_failed(f"the engine could not accept this request: {type(e).__name__}") from None

    @staticmethod
    def _prompt_error(e: ValueError, param: str) -> errors.OpenAIError:
        err = _from_value_error(e, param)
        if err.param in ("prompt", "prompt_token_ids"):
            err.param = param  # the engine sees token ids; the client sent `param`
        return err

    async def _to_engine_request(self, request: GenerateRequest, request_id: str) -> EngineRequest:
        """Token ids and sampling parameters. Templating and tokenizing run in a worker thread: a prompt of
        megabytes takes seconds there, and must not stall every other stream on this replica's event loop."""
        param = _prompt_param(request)
        await self._check_text_size(request, param)
        if isinstance(request, ChatCompletionRequest):
            prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, request.messages)
            max_tokens = request.requested_max_tokens()
            if max_tokens is None:
                room = self._front.engine.max_model_len - len(prompt_ids)
                if room < 1:
                    raise errors.bad_request(
                        f"messages: the prompt is {len(prompt_ids)} tokens; the context limit is "
                        f"{self._front.engine.max_model_len}",
                        "messages",
                    )
                max_tokens = min(self._config.default_max_tokens, room)
        else:
            single = request.single_prompt()
            if isinstance(single, str):
                prompt_ids = await asyncio.to_thread(self._encode, single)
            else:
                prompt_ids = list(single)
            max_tokens = request.max_tokens if request.max_tokens is not None else 16
            # max_tokens=0 (only with echo: score the prompt): the engine draws one token, which the echo
            # drops (vLLM's way); its prefill computes the prompt logprobs.
            max_tokens = max(max_tokens, 1)
        self._check_length(len(prompt_ids), max_tokens, param)
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                seed=request.seed,
                stop=tuple(request.stop_list()),
                stop_token_ids=tuple(request.stop_token_ids or ()),
                ignore_eos=request.ignore_eos,
                logprobs=_engine_logprobs(request),
                prompt_logprobs=request.prompt_logprobs_count(),
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty,
                logit_bias=tuple(request.logit_bias_ids().items()),
                min_tokens=request.min_tokens,
                **request.constraint(),
            )
        except ValueError as e:
            raise _from_value_error(e) from None
        return EngineRequest(request_id, None, prompt_ids, params, request.priority, request.choices_to_generate())

    async def _check_text_size(self, request: GenerateRequest, param: str) -> None:
        """A 400 at once for a text so long it cannot fit the context whatever it tokenizes to: no token
        covers more than `_bytes_per_token()` bytes of text, and a character is at least one byte (doubled,
        for normalisers that expand text). Tokenizing megabytes costs seconds of CPU for nothing."""
        if isinstance(request, ChatCompletionRequest):
            chars = sum(len(m.text()) for m in request.messages)
        else:
            single = request.single_prompt()
            chars = len(single) if isinstance(single, str) else 0
        limit = self._front.engine.max_model_len
        if chars <= limit:  # fits however it tokenizes: no need to know the bound
            return
        if self._bytes_per_token is None:
            self._bytes_per_token = await asyncio.to_thread(_bytes_per_token, self._front.engine.tokenizer)
        if self._bytes_per_token and chars > 2 * self._bytes_per_token * limit:
            raise errors.bad_request(
                f"{param}: {chars} characters are more than {limit} tokens (the context length) of this model "
                f"can hold (a token covers at most {self._bytes_per_token} bytes)",
                param,
            )

    def _check_length(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        """A 400 before the engine sees a prompt that cannot fit (it would only refuse it, later and slower)."""
        limit = self._front.engine.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise errors.bad_request(
                f"{param}: the prompt is {prompt_tokens} tokens; with max_tokens={max_tokens} that exceeds "
                f"the context length (max_model_len={limit})",
                param,
            )

    def _encode(self, prompt: str, allow_empty: bool = False) -> list[int]:
        """A completion prompt's token ids, exactly as the engine tokenizes a text prompt (worker thread)."""
        try:
            ids = list(self._front.engine.tokenizer.encode(prompt))
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer raises on this text is the client's input
            raise errors.invalid_input("prompt", e) from None
        if not ids and not allow_empty:
            raise errors.bad_request("prompt: it tokenizes to nothing", "prompt")
        return ids

    def _chat_prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The chat template over `messages`, tokenized (worker thread)."""
        tokenizer = self._front.engine.tokenizer
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # noqa: BLE001 - a template raises whatever jinja raises; it is the client's input
            raise errors.bad_request(
                f"messages: the model's chat template rejected them: {e}", "messages"
            ) from None
        try:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # noqa: BLE001 - as in _encode
            raise errors.invalid_input("messages", e) from None

    # -- tokenizer routes (vLLM's /tokenize and /detokenize) ---------------------------------------------

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """The token ids the generate routes would compute for this prompt or these messages."""
        self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            ids = await asyncio.to_thread(self._chat_prompt_ids, request.messages, request.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(self._encode, request.prompt, True)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self._front.engine.max_model_len)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of `tokens`; an id outside the vocabulary is a 400 naming `tokens`."""
        self.check_model(request.model)
        vocab = self._front.engine.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise errors.bad_request(f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self._decode, request.tokens))

    def _decode(self, tokens: list[int]) -> str:
        try:
            return str(self._front.engine.tokenizer.decode(tokens))
        except Exception as e:  # noqa: BLE001 - an id the model has but the tokenizer does not know
            raise errors.invalid_input("tokens", e) from None

    # -- engine -> chunks ------------------------------------------------------------------------------

    async def _completion_chunks(self, gen: Generation, include_usage: bool) -> AsyncIterator[StreamChunk]:
        created = now()
        shapers = _Shapers(self._front.engine.tokenizer)  # per choice: text offsets run on across its chunks
        finals: list[RequestOutput] = []
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                out = gen.echo.apply(out) if gen.echo is not None else out
                reason = gen.finish_reason(out) if out.finished else None
                if out.text or out.finished or out.logprobs:
                    shaped = self._completion_logprobs(gen, shapers[out.index], out.logprobs is not None,
                                                       out.logprobs, out.prompt_logprobs)
                    choice = CompletionChoice(index=out.index, text=out.text, logprobs=shaped, finish_reason=reason)
                    yield CompletionStreamResponse(
                        id=gen.request_id,
                        created=created,
                        model=self.model_name,
                        choices=[choice],
                        warning=gen.warning if out.finished else None,
                    )
                if out.finished:
                    finals.append(out)
                if gen.finished and include_usage:
                    yield CompletionStreamResponse(
                        id=gen.request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=summed_usage(finals),
                    )

    async def _chat_chunks(self, gen: Generation, include_usage: bool) -> AsyncIterator[StreamChunk]:
        created = now()
        shaper = LogprobsShaper(self._front.engine.tokenizer)
        finals: list[RequestOutput] = []

        def chunk(index: int, delta: DeltaMessage, reason: FinishReason | None = None,
                  logprobs: list[TokenLogprobs] | None = None) -> ChatCompletionChunk:
            shaped = shaper.chat(logprobs) if logprobs else None
            choice = ChatStreamChoice(index=index, delta=delta, logprobs=shaped, finish_reason=reason)
            return ChatCompletionChunk(
                id=gen.request_id, created=created, model=self.model_name, choices=[choice],
                warning=gen.warning if reason is not None else None,
            )

        for index in range(gen.choices):
            yield chunk(index, DeltaMessage(role="assistant", content=""))
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                if out.text or out.logprobs:  # a token held back by a stop string still has its logprob
                    yield chunk(out.index, DeltaMessage(content=out.text), logprobs=out.logprobs)
                if out.finished:
                    finals.append(out)
                    yield chunk(out.index, DeltaMessage(), gen.finish_reason(out))
                if gen.finished and include_usage:
                    yield ChatCompletionChunk(
                        id=gen.request_id,
                        created=created,
                        model=self.model_name,
                        choices=[],
                        usage=summed_usage(finals),
                    )


class _Shapers(dict[int, LogprobsShaper]):
    """One completions logprobs shaper per choice, made on first use."""

    def __init__(self, tokenizer: object) -> None:
        super().__init__()
        self._tokenizer = tokenizer

    def __missing__(self, index: int) -> LogprobsShaper:
        shaper = self[index] = LogprobsShaper(self._tokenizer)
        return shaper
