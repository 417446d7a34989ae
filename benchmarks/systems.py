"""The systems compared, behind one function each: run a workload on a loaded model, return what happened.

All share the model object, the threads and greedy decoding with EOS ignored, so every request generates
exactly its `max_tokens` everywhere:

* the BATON engine under each policy (`static`, `orca`, `baton`, `baton-pd`): `SamplingParams(ignore_eos=True,
  max_tokens=n)`; the engine is driven in a loop that submits each request once its arrival time has passed;
* `generate`: plain `model.generate` on static batches of `max_batch_size` in arrival order (left padding, an
  attention mask), as a user writes it by hand: each batch runs `max_new_tokens` = its longest request, EOS
  disabled (`eos_token_id=[]`), and each request keeps only its own length; for arrivals over time, a batch is
  whatever has arrived when the previous batch returns;
* `hf-cb`: transformers' own continuous batching (`ContinuousBatchingManager`, paged cache) with
  `add_request(max_new_tokens=n, eos_token_id=-1)` per request, at most `max_batch_size` requests per step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from benchmarks.meters import ForwardMeter, PeakMemory
from benchmarks.workloads import BenchRequest, Workload
from configs import EngineConfig
from configs.engine import PolicyName
from engine import BatonEngine, SamplingParams
from engine.model_loader import LoadedModel
from engine.request import RequestOutput

ENGINE_POLICIES = ("static", "orca", "baton", "baton-pd")
GENERATE = "generate"
HF_CB = "hf-cb"
SYSTEMS = (GENERATE, HF_CB, *ENGINE_POLICIES)  # the order of a run and of the table
BASELINE = GENERATE
CB_PAGE_SIZE = 64  # tokens per page of the paged cache (smaller pages waste less of the preallocated cache)

Progress = Callable[[int], Any]  # called with the number of new tokens produced


@dataclass
class RequestRecord:
    arrival_s: float
    first_token_s: float | None = None  # when the system had the first token (seconds from the run start)
    finish_s: float | None = None  # when the caller had the whole output
    tokens: list[int] = field(default_factory=list)


@dataclass
class TimelinePoint:
    t_s: float  # end of the iteration, seconds from the run start
    rows: int  # rows in the decode forward
    accounted_bytes: int  # engine's accounted device bytes at the iteration's peak


@dataclass
class SystemRun:
    system: str
    wall_s: float  # first arrival (t=0) to the last request's output
    busy_s: float  # time the system was working (the engine's steps, generate calls, CB steps)
    records: dict[str, RequestRecord]
    useful_slots: int  # prompt tokens + (output tokens - 1) per request: what any system must compute
    computed_slots: int  # input positions the forwards actually computed
    forward_s: float  # time inside model forwards
    idle_fraction: float
    outside_forward_fraction: float
    memory: PeakMemory
    peak_accounted_bytes: int | None = None  # engine only: KV window + pool + step transients, weights excluded
    timeline: list[TimelinePoint] = field(default_factory=list)  # engine only, one point per iteration
    details: dict[str, Any] = field(default_factory=dict)


def useful_slots(work: Workload) -> int:
    """Token slots that produce something: every prompt token once, every output token but the last."""
    return sum(len(r.prompt) + r.max_tokens - 1 for r in work.requests)


def run_system(name: str, loaded: LoadedModel, work: Workload, max_batch_size: int, progress: Progress,
               prefill_token_budget: int = 512) -> SystemRun:
    if name in ENGINE_POLICIES:
        return run_engine(name, loaded, work, max_batch_size, progress, prefill_token_budget)
    if name == GENERATE:
        return run_generate(loaded, work, max_batch_size, progress)
    if name == HF_CB:
        return run_transformers_cb(loaded, work, max_batch_size, progress, prefill_token_budget)
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")


def _by_arrival(work: Workload) -> deque[BenchRequest]:
    return deque(sorted(work.requests, key=lambda r: r.arrival_s))


def _sleep_until(t0: float, arrival_s: float) -> None:
    time.sleep(max(0.0, arrival_s - (time.perf_counter() - t0)))


# ---- the BATON engine ------------------------------------------------------------------------------------------
def run_engine(policy: str, loaded: LoadedModel, work: Workload, max_batch_size: int, progress: Progress,
               prefill_token_budget: int = 512, prefix_caching: bool = False,
               prefill_chunk_tokens: int | None = None) -> SystemRun:
    """Step the engine; before each step submit every request whose arrival time has passed."""
    chunk: dict[str, Any] = {} if prefill_chunk_tokens is None else {"prefill_chunk_tokens": prefill_chunk_tokens}
    config = EngineConfig(model=loaded.name, policy=cast(PolicyName, policy), max_batch_size=max_batch_size,
                          prefill_token_budget=prefill_token_budget, num_threads=torch.get_num_threads(),
                          prefix_caching=prefix_caching, **chunk)
    engine = BatonEngine(config, loaded=loaded)
    pending = _by_arrival(work)
    records = {r.request_id: RequestRecord(r.arrival_s) for r in work.requests}
    timeline: list[TimelinePoint] = []

    def take(outs: list[RequestOutput]) -> None:  # at the time a client would get them
        t = time.perf_counter() - t0
        for o in outs:
            rec = records[o.request_id]
            if o.new_token_ids and rec.first_token_s is None:
                rec.first_token_s = t
            rec.tokens.extend(o.new_token_ids)
            if o.finished:
                assert o.finish_reason == "length", (o.request_id, o.finish_reason, o.error)
                rec.finish_s = t
        progress(sum(len(o.new_token_ids) for o in outs))

    with PeakMemory(loaded.device) as memory:
        t0 = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while pending and pending[0].arrival_s <= now:
                r = pending.popleft()
                engine.add_request(r.request_id, prompt_token_ids=r.prompt,
                                   sampling_params=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
            if not engine.has_unfinished_requests():
                _sleep_until(t0, pending[0].arrival_s)
                continue
            take(engine.step(emit=take))  # first tokens as the engine emits them, before the batch forward
            it = engine.stats.history[-1]
            timeline.append(TimelinePoint(time.perf_counter() - t0, it.rows, it.accounted_bytes))
        wall = time.perf_counter() - t0
    s = engine.stats
    return SystemRun(
        system=policy, wall_s=wall, busy_s=s.total_s, records=records, useful_slots=s.useful_slots,
        computed_slots=s.useful_slots + s.idle_slots, forward_s=s.forward_s, idle_fraction=s.idle_fraction,
        outside_forward_fraction=s.outside_forward_fraction, memory=memory,
        peak_accounted_bytes=max((p.accounted_bytes for p in timeline), default=0), timeline=timeline,
        details={"engine_stats": s.summary()},
    )


# ---- plain transformers generate, static batches ----------------------------------------------------------------
def run_generate(loaded: LoadedModel, work: Workload, max_batch_size: int, progress: Progress) -> SystemRun:
    """Static batches of `max_batch_size`, each run to its longest request; a batch forms when the last returns."""
    from transformers import GenerationConfig

    model = loaded.model
    pad = _pad_id(loaded)
    pending = _by_arrival(work)
    queue: list[BenchRequest] = []
    records = {r.request_id: RequestRecord(r.arrival_s) for r in work.requests}
    busy = 0.0
    batches = 0
    with PeakMemory(loaded.device) as memory, ForwardMeter(model) as meter, torch.no_grad():
        t0 = time.perf_counter()
        while pending or queue:
            now = time.perf_counter() - t0
            while pending and pending[0].arrival_s <= now:
                queue.append(pending.popleft())
            if not queue:
                _sleep_until(t0, pending[0].arrival_s)
                continue
            batch, queue = queue[:max_batch_size], queue[max_batch_size:]
            width = max(len(r.prompt) for r in batch)
            steps = max(r.max_tokens for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding: every prompt ends in the last column
                ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
                mask[row, width - len(r.prompt):] = 1
            cfg = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=[],
                                   pad_token_id=pad)
            start = time.perf_counter()
            out = model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                 generation_config=cfg)
            end = time.perf_counter()
            busy += end - start
            batches += 1
            assert out.shape[1] == width + steps, (out.shape, width, steps)
            first = meter.first_end_after(start)
            for row, r in enumerate(batch):
                rec = records[r.request_id]
                rec.tokens = out[row, width:width + r.max_tokens].tolist()
                rec.first_token_s = (first if first is not None else end) - t0  # the prefill forward's end
                rec.finish_s = end - t0  # generate returns the whole batch at once
            progress(sum(r.max_tokens for r in batch))
        wall = time.perf_counter() - t0
    useful = useful_slots(work)
    return SystemRun(
        system=GENERATE, wall_s=wall, busy_s=busy, records=records, useful_slots=useful,
        computed_slots=meter.slots, forward_s=meter.seconds, idle_fraction=_idle(meter.slots, useful),
        outside_forward_fraction=1.0 - meter.seconds / busy if busy else 0.0, memory=memory,
        details={"batches": batches, "forwards": meter.calls, "torch_threads_in_forward": sorted(meter.threads)},
    )


# ---- transformers continuous batching ----------------------------------------------------------------------------
def run_transformers_cb(loaded: LoadedModel, work: Workload, max_batch_size: int, progress: Progress,
                        prefill_token_budget: int = 512) -> SystemRun:
    """transformers' ContinuousBatchingManager with a per-request `max_new_tokens` and EOS disabled.

    The paged cache is sized for `max_batch_size` of the workload's longest requests (on CPU transformers
    would otherwise claim ~90% of host RAM), at most `max_batch_size` requests share a step, and a step
    carries at most `prefill_token_budget + max_batch_size` tokens (the engine's prefill budget plus one
    decode token per row). Runs under `torch.no_grad()` (`inference_mode` breaks its worker thread).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from engine.attention import as_sdpa

    model = loaded.model
    longest = max(len(r.prompt) + r.max_tokens for r in work.requests)
    cb_config = ContinuousBatchingConfig(
        page_size=CB_PAGE_SIZE, num_blocks=max_batch_size * (math.ceil(longest / CB_PAGE_SIZE) + 1),
        max_batch_tokens=prefill_token_budget + max_batch_size, max_requests_per_batch=max_batch_size, seed=0,
    )
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=_pad_id(loaded),
                                  max_new_tokens=max(r.max_tokens for r in work.requests))
    pending = _by_arrival(work)
    records = {r.request_id: RequestRecord(r.arrival_s) for r in work.requests}
    busy = [0.0]
    with PeakMemory(loaded.device) as memory, ForwardMeter(model) as meter, torch.no_grad(), as_sdpa(model):
        manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
        _time_steps(manager, busy)
        manager.start()
        try:
            _wait_ready(manager)
            t0 = time.perf_counter()
            done = 0
            while done < len(records):
                now = time.perf_counter() - t0
                while pending and pending[0].arrival_s <= now:
                    r = pending.popleft()
                    manager.add_request(r.prompt, request_id=r.request_id, max_new_tokens=r.max_tokens,
                                        eos_token_id=-1, record_timestamps=True)
                wait = 0.05 if not pending else min(0.05, pending[0].arrival_s - now)
                result = manager.get_result(timeout=max(wait, 0.002))
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers continuous batching stopped before finishing the workload")
                    continue
                if not result.is_finished():
                    continue
                if result.error:
                    raise RuntimeError(f"transformers continuous batching failed {result.request_id}: {result.error}")
                rec = records[result.request_id]
                rec.finish_s = time.perf_counter() - t0
                rec.tokens = list(result.generated_tokens)
                stamps = result.timestamps or []
                rec.first_token_s = (stamps[0] - t0) if stamps else rec.finish_s
                done += 1
                progress(len(rec.tokens))
            wall = time.perf_counter() - t0
        finally:
            manager.stop(block=True)
            manager.destroy()
    useful = useful_slots(work)
    return SystemRun(
        system=HF_CB, wall_s=wall, busy_s=busy[0], records=records, useful_slots=useful,
        computed_slots=meter.slots, forward_s=meter.seconds, idle_fraction=_idle(meter.slots, useful),
        outside_forward_fraction=1.0 - meter.seconds / busy[0] if busy[0] else 0.0, memory=memory,
        details={"forwards": meter.calls, "torch_threads_in_forward": sorted(meter.threads),
                 "cb_config": {"page_size": cb_config.page_size, "num_blocks": cb_config.num_blocks,
                               "max_batch_tokens": cb_config.max_batch_tokens,
                               "max_requests_per_batch": cb_config.max_requests_per_batch},
                 "attn_implementation": model.config._attn_implementation},
    )


def _time_steps(manager: Any, busy: list[float]) -> None:
    """Add the wall time of every loop iteration that ran a generation step (prepare, forward, update) to busy[0]."""
    body = manager._generation_loop_body

    def timed(batch_processor: Any, bootstrapping: bool) -> bool:
        before = getattr(manager, "current_batch", 0)
        start = time.perf_counter()
        keep_going = body(batch_processor, bootstrapping)
        if getattr(manager, "current_batch", 0) != before:
            busy[0] += time.perf_counter() - start
        return keep_going

    manager._generation_loop_body = timed


def _wait_ready(manager: Any, timeout_s: float = 120.0) -> None:
    """Wait until the worker thread has built its cache, so set-up time is not counted as serving time."""
    deadline = time.perf_counter() + timeout_s
    while manager.batch_processor is None:
        if not manager.is_running() or time.perf_counter() > deadline:
            raise RuntimeError("transformers continuous batching did not start")
        time.sleep(0.01)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _pad_id(loaded: LoadedModel) -> int:
    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _idle(computed: int, useful: int) -> float:
    return max(0, computed - useful) / computed if computed else 0.0
