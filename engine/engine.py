"""The BATON engine: one decode batch that never stops (docs/architecture.md).

`step()` is the table of contents of one iteration: the scheduler plans it, the runner executes the plan,
the scheduler records the result, and the statistics are computed from the plan and the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from autoscaler.probes import MemoryProbe, build_probe
from configs import EngineConfig
from configs.errors import FieldError
from configs.knobs import with_live_knobs
from engine.capacity import CapacityController
from engine.choices import Resume, choice_id, choice_params, choices_to_run
from engine.grammar import Grammars
from engine.host_load import OtherLoad
from engine.kv_cache import BatchKVCache
from engine.memory_controller import build_controller
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner
from engine.outputs import OutputTracker
from engine.plan import IterationPlan, StepResult
from engine.request import Request, RequestOutput, SamplingParams, check_token_ids
from engine.scheduler import Scheduler
from engine.stats import EngineStats, iteration_stats
from engine.thread_tuner import ThreadTuner

log = logging.getLogger(__name__)


class BatonEngine:
    """Dynamic re-batching over an unmodified transformers causal LM. Not thread-safe: see AsyncBatonEngine."""

    def __init__(self, config: EngineConfig, *, loaded: LoadedModel | None = None,
                 controller: CapacityController | None = None, probe: MemoryProbe | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.gguf_file,
                                           config.tokenizer)
        self.tokenizer = self.loaded.tokenizer
        self.runner = ModelRunner(self.loaded.model, self.loaded.device, narrow_linear=config.narrow_linear,
                                  narrow_kernel=config.narrow_kernel, tuner=_thread_tuner(config, self.loaded),
                                  prefill_chunk=config.prefill_chunk_tokens,
                                  attention_kernel=config.attention_kernel, packed_prefill=config.packed_prefill,
                                  captured_forward=config.captured_forward, work_sharing=config.work_sharing)
        self.vocab_size = int(self.loaded.model.get_input_embeddings().num_embeddings)
        self.max_model_len = config.max_model_len or self.runner.shape.max_position_embeddings
        self.cache = self._new_cache()
        self.outputs = OutputTracker(self.tokenizer, _eos_ids(self.loaded))
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.outputs.eos_token_ids)
        if controller is None:
            controller, probe = build_controller(config.controller), build_probe(config.controller)
        self.scheduler = Scheduler(config, self.cache, controller, probe, self.outputs,
                                   _step_bytes_per_row(self.loaded.model.config, self.loaded.dtype), self.grammars)
        self.stats = EngineStats()

    @property
    def iteration(self) -> int:
        return self.scheduler.iteration

    # ---- public surface ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    sampling_params: SamplingParams | None = None, priority: int = 0) -> None:
        """Queue a request. Raises FieldError naming the field for bad input."""
        req = self.make_request(request_id, prompt, prompt_token_ids, sampling_params, priority)
        self.enqueue(req)

    def make_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                     sampling_params: SamplingParams | None = None, priority: int = 0,
                     resume_token_ids: Sequence[int] = ()) -> Request:
        """Validate and tokenise without touching engine state (safe from another thread).

        `resume_token_ids`: output tokens this request already produced elsewhere (another replica that died
        under it). The request continues after them exactly as an undisturbed run would: it re-prefills
        prompt + those tokens, like recompute preemption, and its next draw is number len(resume_token_ids)
        of its seed's stream; its streamed text starts after theirs; a structured-output matcher starts after
        them too."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise FieldError("sampling_params",
                             f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise FieldError("request_id", f"request_id must be a non-empty string, got {request_id!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise FieldError("priority", f"priority must be an integer, got {priority!r}")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        check_token_ids(ids, params, resume_token_ids, self.vocab_size, self.max_model_len)
        resumed = list(resume_token_ids)
        seed = params.seed if params.seed is not None else _derive_seed(self.config.seed, request_id)
        field = params.constraint_field
        # Structured output: the matcher, after the resumed tokens (a FieldError if they break the grammar).
        grammar = self.grammars.matcher(field, params.grammar, resumed) if field and params.grammar else None
        return Request(request_id, ids, params, priority, arrival=-1, seed=seed, output_token_ids=resumed,
                       grammar=grammar)

    def make_choices(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                     sampling_params: SamplingParams | None = None, priority: int = 0, n: int = 1,
                     resume_token_ids: Resume = ()) -> list[Request]:
        """`make_request` for each of a request's `n` choices (engine/choices.py); with n = 1 and a plain
        `resume_token_ids`, exactly `[make_request(...)]`. A mapping `resume_token_ids` runs only the choices
        it names, each after its tokens (a continuation). Their outputs carry `request_id` and the choice's
        index. FieldError naming the field (`n` among them)."""
        run = choices_to_run(n, resume_token_ids)
        if n == 1:
            return [self.make_request(request_id, prompt, prompt_token_ids, sampling_params, priority, run[0])]
        params = sampling_params if sampling_params is not None else SamplingParams()
        ids = self._prompt_ids(prompt, prompt_token_ids)  # tokenised once for every choice
        reqs = []
        for i, resumed in run.items():
            params_i = choice_params(params, i) if isinstance(params, SamplingParams) else params
            req = self.make_request(choice_id(request_id, i), None, ids, params_i, priority, resumed)
            req.parent, req.index = request_id, i
            reqs.append(req)
        return reqs

    def enqueue(self, req: Request) -> None:
        """Queue a request built by `make_request` (on the engine's thread). ValueError for a duplicate id."""
        self.enqueue_all([req])

    def enqueue_all(self, reqs: Sequence[Request]) -> None:
        """Queue requests built by `make_choices` together, in the same iteration: all or, when one's id is
        still running (ValueError), none."""
        running = [r.request_id for r in reqs if r.request_id in self.scheduler.requests]
        if running:
            raise ValueError(f"duplicate request id {running[0]!r}: a request with that id is still running")
        for req in reqs:
            self.scheduler.add(req)
        self._update_gauges()

    def abort_request(self, request_id: str) -> None:
        """Finish a request (every choice of it) with reason `abort`; it leaves the batch at once. Unknown ids
        are ignored."""
        for rid in self.scheduler.choices_of(request_id):
            if self.scheduler.abort(rid):
                self._free_rows([rid])
            self.stats.aborted_requests += 1
        self._update_gauges()

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.requests)

    def validate_knobs(self, knobs: dict[str, Any]) -> EngineConfig:
        """The config these live knobs would give; FieldError naming an unknown knob or a bad value."""
        return with_live_knobs(self.config, knobs)

    def reconfigure(self, **knobs: Any) -> None:
        """Apply live knobs between iterations (the fields marked live: configs/knobs.py)."""
        new = self.validate_knobs(knobs)
        self.config = self.scheduler.config = new
        update = getattr(self.scheduler.controller, "reconfigure", None)
        if update is not None:
            update(new.controller)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected fault: fail every request in flight and start over with an empty batch."""
        self.scheduler.fail_all(message)
        self.cache = self.scheduler.cache = self._new_cache()
        self._update_gauges()
        outputs = self.outputs.drain()
        self.stats.finished_requests += len(outputs)
        return outputs

    def step(self, emit: Callable[[list[RequestOutput]], None] | None = None) -> list[RequestOutput]:
        """One iteration. With `emit`, the first tokens that this iteration's prefills drew are handed to it as
        soon as they are sampled, before the batch forward (a prompt's first token comes a forward sooner);
        the outputs returned are then the rest. Without it, every output is returned at the end."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        result, emitted, outputs = self._execute(plan, emit)
        accounted = self.scheduler.accounted_bytes(rows=result.batch.rows if result.batch else 0)
        self.stats.record(iteration_stats(plan, result, accounted, time.perf_counter() - t0), emitted + outputs)
        if not self.scheduler.requests:  # nothing left to serve: free the last rows now, not at the next step
            self._free_rows(self.scheduler.release_rows())
        self._update_gauges()
        return outputs

    # ---- helpers -----------------------------------------------------------------------------------------
    def _execute(self, plan: IterationPlan, emit: Callable[[list[RequestOutput]], None] | None
                 ) -> tuple[StepResult, list[RequestOutput], list[RequestOutput]]:
        """Run the plan and record what it produced: (result, the outputs handed to `emit`, the others)."""
        if emit is None:
            result = self.runner.execute(plan, self.cache)
            return result, [], self.scheduler.update(plan, result)
        emitted: list[RequestOutput] = []
        parts: list[StepResult] = []

        def after_prefills(part: StepResult) -> None:
            parts.append(part)
            outs = self.scheduler.update_prefills(plan, part)
            emitted.extend(outs)
            if outs:
                emit(outs)

        result = self.runner.execute(plan, self.cache, after_prefills)
        if not parts:
            return result, [], self.scheduler.update(plan, result)
        return result, emitted, self.scheduler.update_batch(plan, result, parts[0])

    def _free_rows(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.cache.remove(rid)

    def _update_gauges(self) -> None:
        s, q = self.stats, self.scheduler.queues
        s.running = sum(1 for r in self.scheduler.running.values() if not r.finished)
        s.waiting, s.prefilled, s.swapped = len(q.waiting), len(q.pool), len(q.swapped)
        s.prefix_cache_bytes = self.scheduler.prefixes.nbytes() if self.scheduler.prefixes is not None else 0

    def _new_cache(self) -> BatchKVCache:
        shape = self.runner.shape
        return BatchKVCache(shape.num_layers, shape.kv_heads, shape.head_dim, self.loaded.dtype,
                            self.loaded.device, row_capacity=self.config.max_batch_size)

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise FieldError("prompt", "give exactly one of prompt or prompt_token_ids")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise FieldError("prompt", f"prompt must be a non-empty string, got {prompt!r}")
            try:
                ids = list(self.tokenizer.encode(prompt))
            except (TypeError, ValueError) as e:  # e.g. a lone UTF-16 surrogate, which JSON allows
                raise FieldError("prompt", f"prompt cannot be tokenized: {e}") from None
            if not ids:
                raise FieldError("prompt", f"prompt {prompt!r} tokenises to nothing")
            return ids
        return list(prompt_token_ids or [])  # checked by check_token_ids


def _thread_tuner(config: EngineConfig, loaded: LoadedModel) -> ThreadTuner | None:
    """On CPU with more than one torch thread, a tuner that falls back to one thread while it is faster."""
    most = torch.get_num_threads()
    if not (config.adaptive_threads and loaded.device.type == "cpu" and most > 1):
        return None
    return ThreadTuner(most, load=OtherLoad())


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def _derive_seed(base: int, request_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{base}:{request_id}".encode()).digest()[:8], "little") >> 1


def _step_bytes_per_row(config: Any, dtype: torch.dtype) -> int:
    """Peak transient bytes one decode row adds: float32 logits plus the widest activations (hidden, MLP)."""
    elem = torch.empty((), dtype=dtype).element_size()
    inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return 4 * config.vocab_size + elem * (4 * config.hidden_size + 2 * inter)
