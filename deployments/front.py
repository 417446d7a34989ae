"""The engine interface the Serve layer codes against (what `engine.AsyncBatonEngine` provides).

Written as a Protocol so a deployment can be given any front by injection: the real engine (built from
config by the app builder) or a fake in tests. Nothing here imports torch or the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from configs import EngineConfig
from engine.choices import Resume
from engine.request import RequestOutput, SamplingParams


class RequestStream(Protocol):
    """The deltas of one request; the last has `finished=True` (`engine.streams.RequestStream`).

    Closing it early (`aclose()`), cancelling the task that awaits it, or dropping it aborts the request in
    the engine; when the engine loop dies, every open stream ends with an `error` output."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def aclose(self) -> None: ...


class EngineCore(Protocol):
    """What the Serve layer reads from `front.engine`."""

    @property
    def tokenizer(self) -> Any: ...  # a Hugging Face tokenizer (has a chat template)

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...  # token ids are in [0, vocab_size)


class GenerationBackend(Protocol):
    """What `OpenAIServing` needs: the engine's limits and tokenizer, and `submit`. An engine front in the
    same process provides it, and so does the ingress's remote engine (deployments/remote_engine.py)."""

    @property
    def engine(self) -> EngineCore: ...

    @property
    def config(self) -> EngineConfig: ...

    def is_healthy(self) -> bool:
        """Whether requests may be submitted now."""
        ...

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
        """Validate (ValueError, a `FieldError` naming the field) and queue a request. `on_close` runs exactly
        once when its stream is over, however it ends; never when this raises. `resume_token_ids`: output
        tokens already streamed elsewhere, to continue after (`BatonEngine.make_request`); by choice index
        for a request with `n` > 1 choices (`BatonEngine.make_choices`), whose outputs carry their index."""
        ...


class EngineFront(GenerationBackend, Protocol):
    """`engine.AsyncBatonEngine`'s public surface: a backend with a lifecycle, metrics and live knobs."""

    def start(self) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def update_controller(self, **knobs: Any) -> None: ...

    def shutdown(self) -> None: ...


FrontFactory = Callable[[EngineConfig], EngineFront]


def build_engine_front(config: EngineConfig) -> EngineFront:
    """The production front: load the model and build the BATON engine (imports torch lazily)."""
    from engine import AsyncBatonEngine

    front: EngineFront = AsyncBatonEngine.from_config(config)
    return front
