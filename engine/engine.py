"""The BATON engine: one decode batch that never stops (design.md 3).

`step()` is the table of contents of one iteration; each line is a small method below it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from autoscaler.capacity import (
    CapacityController,
    CapacityDecision,
    CapacitySnapshot,
    MemoryReading,
    Preemption,
    RowInfo,
)
from configs import EngineConfig
from configs.errors import FieldError
from configs.knobs import with_live_knobs
from engine.kv_cache import BatchKVCache, RowKV
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner
from engine.outputs import OutputTracker
from engine.request import Request, RequestOutput, RequestState, SamplingParams
from engine.sampler import sample
from engine.scheduler import RequestQueues, admission_candidates, get_policy
from engine.stats import EngineStats, IterationStats

log = logging.getLogger(__name__)


class BatonEngine:
    """Dynamic re-batching over an unmodified transformers causal LM. Not thread-safe: see AsyncBatonEngine."""

    def __init__(self, config: EngineConfig, *, loaded: LoadedModel | None = None,
                 controller: CapacityController | None = None, probe: Any = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, config.gguf_file,
                                           config.tokenizer)
        self.tokenizer = self.loaded.tokenizer
        self.runner = ModelRunner(self.loaded.model, self.loaded.device, narrow_linear=config.narrow_linear,
                                  narrow_kernel=config.narrow_kernel)
        shape = self.runner.shape
        self.vocab_size = int(self.loaded.model.get_input_embeddings().num_embeddings)
        self.max_model_len = config.max_model_len or shape.max_position_embeddings
        self.policy = get_policy(config.policy)
        self.cache = self._new_cache()
        self.queues = RequestQueues()
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.running: dict[str, Request] = {}  # requests holding a row (finished ones until retired)
        self.outputs = OutputTracker(self.tokenizer, _eos_ids(self.loaded))
        if controller is None:
            from autoscaler.registry import build_controller, build_probe

            controller, probe = build_controller(config.controller), build_probe(config.controller)
        self.controller: CapacityController = controller
        self.probe = probe
        self.stats = EngineStats()
        self.iteration = 0
        self._arrivals = itertools.count()
        self._step_bytes_per_row = _step_bytes_per_row(self.loaded.model.config, self.loaded.dtype)

    # ---- public surface ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    sampling_params: SamplingParams | None = None, priority: int = 0) -> None:
        """Queue a request. Raises FieldError naming the field for bad input."""
        req = self.make_request(request_id, prompt, prompt_token_ids, sampling_params, priority)
        self.enqueue(req)

    def make_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                     sampling_params: SamplingParams | None = None, priority: int = 0) -> Request:
        """Validate and tokenise without touching engine state (safe from another thread)."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise FieldError("sampling_params",
                             f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise FieldError("request_id", f"request_id must be a non-empty string, got {request_id!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise FieldError("priority", f"priority must be an integer, got {priority!r}")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise FieldError(
                "prompt",
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the model's context length ({self.max_model_len})"
            )
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise FieldError("stop_token_ids",
                             f"stop_token_ids {bad_stop} outside the vocabulary (size {self.vocab_size})")
        seed = params.seed if params.seed is not None else _derive_seed(self.config.seed, request_id)
        return Request(request_id, ids, params, priority, arrival=-1, seed=seed)

    def enqueue(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}: a request with that id is still running")
        req.arrival = next(self._arrivals)
        self.requests[req.request_id] = req
        self.queues.waiting[req.request_id] = req
        self.outputs.track(req)

    def abort_request(self, request_id: str) -> None:
        """Finish a request with reason `abort`; it leaves the batch at once. Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is not None:
            self._end(req, "abort")
            self._update_gauges()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def validate_knobs(self, knobs: dict[str, Any]) -> EngineConfig:
        """The config these live knobs would give; FieldError naming an unknown knob or a bad value."""
        return with_live_knobs(self.config, knobs)

    def reconfigure(self, **knobs: Any) -> None:
        """Apply live knobs between iterations (the fields marked live: configs/knobs.py)."""
        new = self.validate_knobs(knobs)
        self.config = new
        update = getattr(self.controller, "reconfigure", None)
        if update is not None:
            update(new.controller)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected fault: fail every request in flight and start over with an empty batch."""
        for req in list(self.requests.values()):
            self.outputs.finish(req, "error", message)
        self.requests.clear()
        self.running.clear()
        self.queues = RequestQueues()
        self.cache = self._new_cache()
        self._update_gauges()
        return self.outputs.drain()

    def step(self) -> list[RequestOutput]:
        """One iteration."""
        t0, f0 = time.perf_counter(), self.runner.forward_s
        it = IterationStats(iteration=self.iteration)
        self._retire_finished_rows()
        decision = self._consult_controller(it)
        self._preempt(decision.preempt)
        joining = self._admit(decision.admit, it)
        self._prefill_ahead(decision.prefill_bytes, it)
        logits = self._decode(joining, it)
        self._sample(logits)
        return self._emit(it, t0, f0)

    # ---- the iteration, in order -----------------------------------------------------------------------
    def _retire_finished_rows(self) -> None:
        finished = [rid for rid in self.cache.ids if self.running[rid].finished]
        # Run to completion (static) keeps finished rows computing until the whole batch has drained.
        if self.policy.retire_at_once or len(finished) == self.cache.rows:
            for rid in finished:
                self._drop_row(rid)

    def _consult_controller(self, it: IterationStats) -> CapacityDecision:
        t0 = time.perf_counter()
        snapshot = self._snapshot()
        decision = self.controller.decide(snapshot)
        it.controller_s = time.perf_counter() - t0
        it.capacity = decision.capacity
        self.stats.admissions_refused_for_memory += decision.refused_for_memory
        return decision

    def _preempt(self, preemptions: tuple[Preemption, ...]) -> None:
        for p in preemptions:
            req = self.running.get(p.request_id)
            assert req is not None and not req.finished, f"cannot preempt {p.request_id}: not running"
            if p.mode == "swap":
                kv = self.cache.extract(req.request_id).to("cpu")
                self.queues.swapped[req.request_id] = kv
                req.state = RequestState.SWAPPED
            else:  # recompute: drop the KV; it is prefilled again from prompt + generated tokens
                self.queues.waiting[req.request_id] = req
                req.state = RequestState.WAITING
            self.cache.remove(req.request_id)
            del self.running[req.request_id]
            req.preemptions += 1
            self.stats.preemptions += 1
            self.stats.preemptions_by_mode[p.mode] += 1

    def _admit(self, admit: tuple[str, ...], it: IterationStats) -> list[str]:
        """Embed admitted requests. Returns those whose prompt rides inside this iteration's batch forward."""
        in_batch = []
        for rid in admit:
            req = self.requests[rid]
            kv = self.queues.swapped.pop(rid, None) or self.queues.pool.pop(rid, None)
            if kv is None:
                del self.queues.waiting[rid]
                if self.policy.join == "in_batch":
                    in_batch.append(rid)
                    kv = RowKV.empty_like(self.cache)
                else:
                    kv = self._prefill(req, it)
                    if kv is None:
                        continue
            self.cache.insert(rid, kv)
            self.running[rid] = req
            req.state = RequestState.RUNNING
        return in_batch

    def _prefill_ahead(self, allowance: int | None, it: IterationStats) -> None:
        """baton-pd: prefill waiting prompts into the pool, within the iteration's token budget and the
        controller's memory allowance (bytes). With an empty batch and pool one prompt always goes."""
        if not self.policy.prefill_ahead:
            return
        budget = self.config.prefill_token_budget
        pool_size = self.config.prefill_pool_size
        room = (self.config.max_batch_size if pool_size is None else pool_size) - len(self.queues.pool)
        for req in self.queues.waiting_by_urgency():
            n = len(req.all_token_ids)
            must = self.cache.rows == 0 and not self.queues.pool and it.prefill_tokens == 0
            over_memory = allowance is not None and n * self.cache.bytes_per_token > allowance
            if room <= 0 or (not must and ((n > budget and it.prefill_tokens > 0) or over_memory)):
                break
            if allowance is not None:
                allowance -= n * self.cache.bytes_per_token
            del self.queues.waiting[req.request_id]
            kv = self._prefill(req, it)
            budget -= n
            if kv is not None:
                self.queues.pool[req.request_id] = kv
                req.state = RequestState.PREFILLED
                room -= 1

    def _decode(self, joining: list[str], it: IterationStats) -> torch.Tensor | None:
        """One forward of the batch: a decode step, widened to carry joining prompts (static/orca)."""
        n = self.cache.rows
        if n == 0:
            return None
        inputs = self._batch_inputs(joining, it)
        try:
            logits = self.runner.batch_forward(self.cache, *inputs)
        except Exception as e:  # a failed batch fails its rows, never the engine
            log.exception("batch forward failed")
            for rid in list(self.cache.ids):
                self._end(self.running[rid], "error", f"batch forward failed: {e}")
            return None
        it.attended_columns = n * self.cache.length
        it.padded_columns = it.attended_columns - sum(self.cache.real)
        return logits

    def _sample(self, logits: torch.Tensor | None) -> None:
        if logits is None:
            return
        live = [(r, self.running[rid]) for r, rid in enumerate(self.cache.ids) if not self.running[rid].finished]
        if not live:
            return
        reqs = [q for _, q in live]
        if len(live) < logits.shape[0]:  # run-to-completion rows that are done are not sampled
            logits = logits.index_select(0, torch.tensor([r for r, _ in live], device=logits.device))
        tokens = sample(logits, [q.params for q in reqs], [q.seed for q in reqs],
                        [len(q.output_token_ids) for q in reqs])
        for req, tok in zip(reqs, tokens, strict=True):
            self.outputs.on_token(req, tok)
            self._after_token(req)

    def _emit(self, it: IterationStats, t0: float, f0: float) -> list[RequestOutput]:
        outs = self.outputs.drain()
        it.cache_columns = self.cache.length
        it.accounted_bytes = self._held_bytes() + it.rows * self._step_row_bytes()
        if self.probe is not None:  # the step's peak as the probe sees it (engine accounting + everyone else)
            reading = self._without_cache_headroom(
                self.probe.read(engine_bytes=it.accounted_bytes, iteration=self.iteration))
            it.memory_fraction = max(reading.used_bytes, reading.engine_bytes) / reading.total_bytes
        it.forward_s = self.runner.forward_s - f0
        it.total_s = time.perf_counter() - t0
        self._update_gauges()
        self.stats.generated_tokens += sum(len(o.new_token_ids) for o in outs)
        self.stats.record(it)
        self.iteration += 1
        if not self.requests:  # nothing left to serve: free the last rows now, not at the next step
            self._retire_finished_rows()
        return outs

    # ---- helpers -----------------------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        s = self.stats
        s.running = sum(1 for q in self.running.values() if not q.finished)
        s.waiting, s.prefilled, s.swapped = (len(self.queues.waiting), len(self.queues.pool),
                                             len(self.queues.swapped))

    def _without_cache_headroom(self, reading: MemoryReading) -> MemoryReading:
        """A real probe (NVML, torch, host RSS) sees the whole preallocated cache buffer as used. Its unused
        headroom is the engine's own reserve, reused as rows grow; counting it would make the controller
        preempt rows whose removal can never lower the reading. The simulated probe counts only
        `engine_bytes`, so it needs no correction."""
        if reading.source == "simulated":
            return reading
        headroom = self.cache.reserved_bytes() - self.cache.used_bytes()
        return replace(reading, used_bytes=max(0, reading.used_bytes - headroom))

    def _held_bytes(self) -> int:
        """Device bytes the engine holds between steps: the batch cache window and the prefilled pool."""
        return self.cache.used_bytes() + self.queues.held_bytes()[0]

    def _step_row_bytes(self) -> int:
        """Transient bytes one row adds during a decode step (activations, logits, attention scores)."""
        return self._step_bytes_per_row + 4 * self.runner.shape.kv_heads * (self.cache.length + 1)

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
            ids = list(self.tokenizer.encode(prompt))
            if not ids:
                raise FieldError("prompt", f"prompt {prompt!r} tokenises to nothing")
            return ids
        ids = list(prompt_token_ids or [])
        if not ids:
            raise FieldError("prompt_token_ids", "prompt_token_ids must not be empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise FieldError("prompt_token_ids",
                             f"prompt_token_ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _prefill(self, req: Request, it: IterationStats) -> RowKV | None:
        """Prefill prompt + generated tokens alone; sample the next token. None if the request ended."""
        ids = req.all_token_ids
        try:
            kv, logits = self.runner.prefill(ids)
        except Exception as e:
            log.exception("prefill of %s failed", req.request_id)
            self._end(req, "error", f"prefill failed: {e}")
            return None
        it.prefill_tokens += len(ids)
        it.useful_slots += len(ids)
        tok = sample(logits[None], [req.params], [req.seed], [len(req.output_token_ids)])[0]
        self.outputs.on_token(req, tok)
        self._after_token(req)
        return None if req.finished else kv

    def _batch_inputs(self, joining: list[str], it: IterationStats
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids, positions and real-token flags [rows, T] for the batch forward; counts idle slots."""
        ids, n = self.cache.ids, self.cache.rows
        reqs = [self.running[rid] for rid in ids]
        idle_rows = sum(1 for q in reqs if q.finished)  # run-to-completion rows that are done but computed
        if not joining:  # the common, pure decode step
            it.rows, it.decode_tokens = n, n - idle_rows
            it.useful_slots += n - idle_rows
            it.idle_slots += idle_rows
            return (torch.tensor([[q.all_token_ids[-1]] for q in reqs]),
                    torch.tensor(self.cache.real)[:, None], torch.ones(n, 1, dtype=torch.bool))
        lengths = {rid: len(self.running[rid].all_token_ids) for rid in joining}
        t = max(lengths.values())
        inp = torch.zeros(n, t, dtype=torch.long)
        pos = torch.zeros(n, t, dtype=torch.long)
        real = torch.zeros(n, t, dtype=torch.bool)
        for r, (rid, q) in enumerate(zip(ids, reqs, strict=True)):
            if rid in lengths:
                k = lengths[rid]
                inp[r, t - k:] = torch.tensor(q.all_token_ids)
                pos[r, t - k:] = torch.arange(k)
                real[r, t - k:] = True
            else:
                inp[r, -1], pos[r, -1], real[r, -1] = q.all_token_ids[-1], self.cache.real[r], True
        useful = sum(lengths.values()) + (n - len(joining) - idle_rows)
        it.rows, it.decode_tokens = n, n - len(joining) - idle_rows
        it.prefill_tokens += sum(lengths.values())
        it.useful_slots += useful
        it.idle_slots += n * t - useful
        return inp, pos, real

    def _after_token(self, req: Request) -> None:
        if req.finished:
            self._end(req, req.finish_reason or "stop", req.error)

    def _end(self, req: Request, reason: Any, error: str | None = None) -> None:
        """Bookkeeping for a request that has finished, failed or been aborted."""
        self.outputs.finish(req, reason, error)
        if self.requests.pop(req.request_id, None) is None:
            return
        self.queues.discard(req.request_id)
        if reason == "abort":
            self.stats.aborted_requests += 1
        else:
            self.stats.finished_requests += 1
        # Aborted and failed rows leave at once; finished rows follow the policy at the next retirement.
        if reason in ("abort", "error") and req.request_id in self.running:
            self._drop_row(req.request_id)

    def _drop_row(self, request_id: str) -> None:
        self.cache.remove(request_id)
        del self.running[request_id]

    def _snapshot(self) -> CapacitySnapshot:
        rows = tuple(
            RowInfo(rid, q.priority, q.arrival, self.cache.real[r], q.remaining, q.preemptions)
            for r, (rid, q) in enumerate((rid, self.running[rid]) for rid in self.cache.ids)
        )
        candidates = admission_candidates(self.policy, self.requests, self.queues, self.cache.rows)
        swapped_bytes = self.queues.held_bytes()[1]
        step_row = self._step_row_bytes()
        memory = None
        if self.probe is not None:  # what the engine holds between steps; the controller adds the step peak
            memory = self._without_cache_headroom(
                self.probe.read(engine_bytes=self._held_bytes(), iteration=self.iteration))
        return CapacitySnapshot(
            iteration=self.iteration, max_rows=self.config.max_batch_size, rows=rows, candidates=candidates,
            waiting=len(self.queues.waiting), batch_length=self.cache.length,
            bytes_per_token=self.cache.bytes_per_token, step_bytes_per_row=step_row,
            swapped_bytes=swapped_bytes, memory=memory,
        )


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
