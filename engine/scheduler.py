"""The scheduler: who retires, who is preempted, who joins and what is prefilled, each iteration.

It coordinates three things it does not own: the batching policy (data, below), the capacity controller
(a pure function of a `CapacitySnapshot`, engine/capacity.py and engine/memory_controller.py) and the KV
cache, which it only reads (rows, lengths, bytes). It never runs the model and never writes the cache:
`schedule()` returns an `IterationPlan` for the runner, `update()` takes the runner's `StepResult` back.
See docs/architecture.md.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Literal

from autoscaler.probes.base import MemoryProbe, MemoryReading
from configs import EngineConfig
from engine.capacity import CapacityController, CapacityDecision, CapacitySnapshot, QueuedInfo, RowInfo
from engine.grammar import Grammars
from engine.kv_cache import BatchKVCache, RowKV
from engine.outputs import OutputTracker
from engine.plan import BatchRow, Draw, IterationPlan, Join, Prefill, SampleSpec, StepResult, sample_spec
from engine.prefix_cache import PrefixCache
from engine.request import FinishReason, Request, RequestOutput, RequestState, TokenLogprobs

JoinMode = Literal["in_batch", "prefill_on_admit", "from_pool"]


@dataclass(frozen=True)
class Policy:
    name: str
    join: JoinMode  # in_batch: the prompt rides in the batch forward (padded); else prefilled alone
    retire_at_once: bool  # finished rows leave the batch at once (False: run to completion)
    prefill_ahead: bool  # prefill waiting prompts into the pool within a token budget, ahead of need


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("static", join="in_batch", retire_at_once=False, prefill_ahead=False),
        Policy("orca", join="in_batch", retire_at_once=True, prefill_ahead=False),
        Policy("baton", join="prefill_on_admit", retire_at_once=True, prefill_ahead=False),
        Policy("baton-pd", join="from_pool", retire_at_once=True, prefill_ahead=True),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


class RequestQueues:
    """Requests outside the batch: waiting (for prefill), prefilled (the pool), swapped (KV on host)."""

    def __init__(self) -> None:
        self.waiting: dict[str, Request] = {}
        self.pool: dict[str, RowKV] = {}
        self.swapped: dict[str, RowKV] = {}
        self.partial: dict[str, RowKV] = {}  # waiting requests' first chunks, computed (chunked prefill)

    def waiting_by_urgency(self) -> list[Request]:
        return sorted(self.waiting.values(), key=lambda r: (r.priority, r.arrival))

    def held_bytes(self) -> tuple[int, int]:
        """(device bytes of the prefilled pool and of partial prefills, host bytes of swapped KV)."""
        device = sum(kv.nbytes() for kv in (*self.pool.values(), *self.partial.values()))
        return device, sum(kv.nbytes() for kv in self.swapped.values())

    def discard(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        self.pool.pop(request_id, None)
        self.swapped.pop(request_id, None)
        self.partial.pop(request_id, None)


def queued_info(req: Request) -> QueuedInfo:
    state = {RequestState.WAITING: "waiting", RequestState.PREFILLED: "prefilled",
             RequestState.SWAPPED: "swapped"}[req.state]
    # Once embedded, a row caches every token but the newest (which is the next decode input).
    return QueuedInfo(request_id=req.request_id, priority=req.priority, arrival=req.arrival,
                      length=len(req.all_token_ids) - (0 if state == "waiting" else 1),
                      state=state, preemptions=req.preemptions, remaining=req.remaining)  # type: ignore[arg-type]


class Scheduler:
    """Owns the requests and their queues; plans each iteration and records its outcome."""

    def __init__(self, config: EngineConfig, cache: BatchKVCache, controller: CapacityController,
                 probe: MemoryProbe | None, outputs: OutputTracker, step_bytes_per_row: int,
                 grammars: Grammars) -> None:
        self.config = config  # replaced by the engine on reconfigure
        self.policy = get_policy(config.policy)
        self.cache = cache  # read only: rows, lengths and bytes
        self.controller, self.probe, self.outputs = controller, probe, outputs
        self.grammars = grammars  # builds a request's structured-output matcher when it leaves the waiting queue
        self.step_bytes_per_row = step_bytes_per_row
        self.queues = RequestQueues()
        self.prefixes = _prefix_cache(config, self.policy)  # None: prefix caching off
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.running: dict[str, Request] = {}  # requests holding a row (finished ones until retired)
        self.iteration = 0
        self._arrivals = itertools.count()

    # ---- requests in and out ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}: a request with that id is still running")
        req.arrival = next(self._arrivals)
        self.requests[req.request_id] = req
        self.queues.waiting[req.request_id] = req
        self.outputs.track(req)

    def abort(self, request_id: str) -> bool:
        """Finish a request with reason `abort`. True if it held a row, which the caller must free now."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._end(req, "abort")
        return self.running.pop(request_id, None) is not None

    def choices_of(self, request_id: str) -> list[str]:
        """The unfinished engine requests submitted as `request_id`: itself, or its n choices."""
        return [rid for rid, r in self.requests.items() if r.output_id == request_id]

    def _fresh_choices(self, req: Request) -> list[Request]:
        """The unfinished choices of `req`'s request with no token yet, `req` among them: the prompt logprobs
        computed for `req` (choice 0, engine/choices.py) go out to each. A choice resumed after the tokens it
        already streamed (a continuation) had them then."""
        return [r for r in self.requests.values() if r.output_id == req.output_id and not r.output_token_ids]

    def release_rows(self) -> list[str]:
        """With nothing left to serve, every remaining (finished) row; the caller frees them."""
        assert not self.requests, "rows of unfinished requests are never released"
        rows, self.running = list(self.running), {}
        return rows

    # ---- one iteration ----------------------------------------------------------------------------------
    def schedule(self) -> IterationPlan:
        """Decide the next iteration. Commits the decisions to the queues; the KV moves come back in update."""
        retire = self._retiring()
        t0 = time.perf_counter()
        memory = self._read_memory(retire)
        decision = self.controller.decide(self._snapshot(retire, memory))
        controller_s = time.perf_counter() - t0
        kept = [rid for rid in self.cache.ids if rid not in retire]
        for rid in retire:
            del self.running[rid]
        self._preempt(decision, kept)
        self._evict_prefixes(decision.evict_bytes)
        joins, prefills = self._admit(decision.admit)
        ahead = self._prefill_ahead(decision.prefill_bytes, sum(p.computed_tokens for p in prefills))
        self._make_room_for_pool(decision.prefill_bytes, ahead)
        prefills += ahead
        return IterationPlan(
            iteration=self.iteration, capacity=decision.capacity, retire=tuple(retire), preempt=decision.preempt,
            join=tuple(joins), prefill=tuple(prefills), batch=self._batch_rows(kept, joins, prefills),
            memory=memory, refused_for_memory=decision.refused_for_memory, controller_s=controller_s,
        )

    def update(self, plan: IterationPlan, result: StepResult) -> list[RequestOutput]:
        """Record what the runner produced: tokens appended, stops checked, KV filed. Returns the outputs."""
        self._record_prefills(plan, result)
        self._record_batch(plan, result, prefills_recorded=None)
        return self.outputs.drain()

    def update_prefills(self, plan: IterationPlan, prefills: StepResult) -> list[RequestOutput]:
        """`update` in two calls, for outputs that go out as soon as they exist: first what the prefills
        produced (ModelRunner.execute's `after_prefills`), before the batch forward; then `update_batch` with the
        whole result. Returns the prefills' outputs (their first tokens)."""
        self._record_prefills(plan, prefills)
        return self.outputs.drain()

    def update_batch(self, plan: IterationPlan, result: StepResult, prefills: StepResult) -> list[RequestOutput]:
        """The rest of `update` after `update_prefills(plan, prefills)`: returns the other outputs."""
        self._record_batch(plan, result, prefills_recorded=prefills)
        return self.outputs.drain()

    def _record_prefills(self, plan: IterationPlan, result: StepResult) -> None:
        self.queues.swapped.update(result.swapped)
        self._record_prompt_logprobs(result.prompt_logprobs)
        for p in plan.prefill:
            kv = result.prefilled.get(p.request_id)
            if kv is None:
                continue
            if self.prefixes is not None:
                self.prefixes.insert(p.token_ids[:p.until], kv)  # until None: all of them
            if p.until is not None and p.request_id in self.queues.waiting:
                self.queues.partial[p.request_id] = kv
        for d in (d for p in plan.prefill for d in p.draws()):
            if d.request_id in result.prefill_tokens:
                req = self.requests[d.request_id]
                self._on_token(req, result.prefill_tokens[d.request_id], result.prefill_logprobs.get(d.request_id))
                if not d.join and not req.finished:
                    self.queues.pool[d.request_id] = result.pooled[d.request_id]
                    req.state = RequestState.PREFILLED

    def _record_prompt_logprobs(self, by_request: dict[str, list[TokenLogprobs | None]]) -> None:
        for rid, prompt_logprobs in by_request.items():  # before the tokens: they lead the first token's output
            for choice in self._fresh_choices(self.requests[rid]):
                self.outputs.on_prompt_logprobs(choice, prompt_logprobs)

    def _record_batch(self, plan: IterationPlan, result: StepResult, prefills_recorded: StepResult | None) -> None:
        """The batch's tokens and the iteration's failures (last: a token sampled before a failure is kept).
        `prefills_recorded`: the prefills' part, recorded already (its prompt logprobs are not recorded again)."""
        done = prefills_recorded.prompt_logprobs if prefills_recorded is not None else result.prompt_logprobs
        self._record_prompt_logprobs({rid: lp for rid, lp in result.prompt_logprobs.items() if rid not in done})
        for rid, token in result.batch_tokens.items():
            req = self.running[rid]
            if not req.finished:  # a baton join whose first token already finished it
                self._on_token(req, token, result.batch_logprobs.get(rid))
        for rid, error in result.failed.items():  # last: a token sampled before the failure is kept
            if rid not in self.cache.ids:  # a baton join whose prefill failed never got its row
                self.running.pop(rid, None)
            if rid in self.requests:
                self._end(self.requests[rid], "error", error)
        self.iteration += 1

    def accounted_bytes(self, rows: int) -> int:
        """Device bytes the engine holds between steps (cache window + pool) plus `rows` rows' step peak."""
        return self._held_bytes(self.cache.used_bytes()) + rows * self._step_row_bytes(self.cache.length)

    def fail_all(self, message: str) -> None:
        """Fail every request in flight and forget every queue (the caller starts a new cache)."""
        for req in list(self.requests.values()):
            self.outputs.finish(req, "error", message)
        self.requests.clear()
        self.running.clear()
        self.queues = RequestQueues()
        if self.prefixes is not None:
            self.prefixes.clear()

    # ---- planning, in order -----------------------------------------------------------------------------
    def _retiring(self) -> list[str]:
        """Finished rows that leave now. Run to completion (static) keeps them computing until the whole
        batch has drained; a failed row always leaves."""
        finished = [rid for rid in self.cache.ids if self.running[rid].finished]
        if self.policy.retire_at_once or len(finished) == self.cache.rows:
            return finished
        return [rid for rid in finished if self.running[rid].finish_reason == "error"]

    def _preempt(self, decision: CapacityDecision, kept: list[str]) -> None:
        for p in decision.preempt:
            req = self.running.pop(p.request_id)
            assert not req.finished, f"cannot preempt {p.request_id}: finished"
            kept.remove(p.request_id)
            if p.mode == "swap":  # its KV arrives in the step result
                req.state = RequestState.SWAPPED
            else:  # recompute: it is prefilled again from prompt + generated tokens
                self.queues.waiting[req.request_id] = req
                req.state = RequestState.WAITING
                req.grammar = None  # like its KV, rebuilt from its tokens when it leaves the queue
            req.preemptions += 1

    def _admit(self, admit: tuple[str, ...]) -> tuple[list[Join], list[Prefill]]:
        """Joins from the pool and host; waiting requests join empty (in_batch) or prefilled now (baton)."""
        joins: list[Join] = []
        prefills: list[Prefill] = []
        admitted, taken = set(admit), set()
        for rid in admit:
            if rid in taken:  # prefilled with a sibling choice
                continue
            req = self.requests[rid]
            kv = self.queues.swapped.pop(rid, None) or self.queues.pool.pop(rid, None)
            if kv is None:
                self._leave_waiting(req)
            if kv is None and self.policy.join == "prefill_on_admit":
                group = [req] + [s for s in self._waiting_siblings(req) if s.request_id in admitted]
                for s in group[1:]:
                    self._leave_waiting(s)
                    taken.add(s.request_id)
                prefills.append(self._prefill(group, join=True))
                for r in group:
                    if r.remaining > 1:  # a request whose first token is also its last never needs a row
                        self.running[r.request_id] = r
                        r.state = RequestState.RUNNING
                continue
            joins.append(Join(rid, kv))
            self.running[rid] = req
            req.state = RequestState.RUNNING
        return joins, prefills

    def _prefill_ahead(self, allowance: int | None, planned: int) -> list[Prefill]:
        """baton-pd: prefill waiting prompts into the pool, within the iteration's token budget and the
        controller's memory allowance (bytes). With an empty batch and pool one prompt always goes."""
        if not self.policy.prefill_ahead:
            return []
        budget, tokens = self.config.prefill_token_budget, planned
        pool_size = self.config.prefill_pool_size
        room = (self.config.max_batch_size if pool_size is None else pool_size) - len(self.queues.pool)
        empty = not self.running and not self.queues.pool
        out: list[Prefill] = []
        for req in self.queues.waiting_by_urgency():
            if req.request_id not in self.queues.waiting:  # prefilled with a sibling choice
                continue
            if room <= 0:
                break
            prefill = self._prefill([req], join=False)
            n = len(prefill.token_ids)  # the pool holds them all
            computed = n - prefill.cached_tokens  # the budget counts only what is computed
            entry = n * self.cache.bytes_per_token  # each pool entry is counted, siblings' copies too
            must = empty and tokens == 0
            over_memory = allowance is not None and entry > allowance
            chunk = None if must or over_memory or computed <= budget else self._first_chunks(prefill, budget)
            if chunk is not None:  # a long prompt: as many whole chunks as the budget allows, the rest later
                out.append(chunk)
                break
            if not must and ((computed > budget and tokens > 0) or over_memory):
                break
            group = [req]
            for s in self._waiting_siblings(req):  # computed once: they cost pool room and memory, no tokens
                if len(group) >= room or (allowance is not None and (len(group) + 1) * entry > allowance):
                    break
                group.append(s)
            if allowance is not None:
                allowance -= len(group) * entry
            for r in group:
                self._leave_waiting(r)
            # the lead's prefill as built above; with siblings, rebuilt once to carry their draws
            out.append(prefill if len(group) == 1 else
                       self._prefill(group, join=False, prefix=prefill.prefix, looked_up=prefill.looked_up))
            budget, tokens, room = budget - computed, tokens + computed, room - len(group)
        return out

    def _first_chunks(self, prefill: Prefill, budget: int) -> Prefill | None:
        """Chunked prefill: `prefill` stopped after the whole chunks (`prefill_chunk_tokens`) that fit `budget`,
        so a long prompt never holds the batch's decode step back for more than the budget's worth; None when
        not one chunk fits, or for a prefill that needs every position's logits (prompt logprobs)."""
        chunk = self.config.prefill_chunk_tokens
        until = prefill.cached_tokens + budget // chunk * chunk
        if until <= prefill.cached_tokens or until >= len(prefill.token_ids) or prefill.prompt_logprobs is not None:
            return None
        return replace(prefill, until=until, join=False, siblings=())

    def _waiting_siblings(self, req: Request) -> list[Request]:
        """The other choices of `req`'s request still waiting with exactly its tokens (engine/choices.py):
        one prefill computes them all."""
        if req.parent is None:
            return []
        same = [r for r in self.queues.waiting.values()
                if r is not req and r.parent == req.parent and r.all_token_ids == req.all_token_ids]
        return sorted(same, key=lambda r: r.index)

    def _prefill(self, group: list[Request], join: bool, prefix: RowKV | None = None, looked_up: bool | None = None
                 ) -> Prefill:
        """One prefill of `group[0]`'s tokens for every request of `group` (siblings with the same tokens), on
        top of their longest cached prefix when the prefix cache has one (`prefix`/`looked_up`: the lookup
        already made for them). A prefill that computes its prompt's logprobs computes every prompt token (the
        cache holds only KV). With `join` (baton), each whose first token is not also its last takes a row."""
        draws = [Draw(r.request_id, self._spec(r), join and r.remaining > 1) for r in group]
        first = draws[0]
        ids = tuple(group[0].all_token_ids)
        prefill = Prefill(first.request_id, ids, first.sample, first.join, siblings=tuple(draws[1:]))
        own = self.queues.partial.get(first.request_id)
        if own is not None:  # its own first chunks, computed in earlier iterations
            prefix, looked_up = own, False
        elif looked_up is None:
            looked_up = self.prefixes is not None
            prefix = self.prefixes.lookup(ids) if self.prefixes is not None else None
        if prefill.prompt_logprobs is not None:  # it computes every prompt position itself
            prefix, looked_up = None, False
        return replace(prefill, prefix=prefix, looked_up=looked_up)

    def _evict_prefixes(self, nbytes: int) -> None:
        """Memory pressure: the prefix cache gives back `nbytes` (least recently used first), before any row."""
        if self.prefixes is not None and nbytes > 0:
            self.prefixes.evict(nbytes)

    def _make_room_for_pool(self, allowance: int | None, prefills: list[Prefill]) -> None:
        """The controller's pool allowance counts the prefix cache as free: evict what the pool now takes."""
        if self.prefixes is None or allowance is None:
            return
        planned = sum(len(p.token_ids) * len(p.draws()) for p in prefills) * self.cache.bytes_per_token
        free = max(0, allowance - self.prefixes.nbytes())
        self._evict_prefixes(planned - free)

    def _leave_waiting(self, req: Request) -> None:
        """`req` leaves the waiting queue to be computed: a request with a grammar whose matcher was dropped
        (recompute preemption) gets it back, rebuilt by replaying its output tokens."""
        del self.queues.waiting[req.request_id]
        self.queues.partial.pop(req.request_id, None)
        field = req.params.constraint_field
        if field is not None and req.grammar is None:
            assert req.params.grammar is not None
            req.grammar = self.grammars.matcher(field, req.params.grammar, req.output_token_ids)

    def _batch_rows(self, kept: list[str], joins: list[Join], prefills: list[Prefill]) -> tuple[BatchRow, ...]:
        rows = []
        in_batch = {j.request_id for j in joins if j.kv is None}
        for rid in kept + [j.request_id for j in joins]:
            req = self.running[rid]
            feed = tuple(req.all_token_ids) if rid in in_batch else (req.all_token_ids[-1],)
            rows.append(BatchRow(rid, feed, None if req.finished else self._spec(req)))
        rows += [BatchRow(d.request_id, None, self._spec(self.requests[d.request_id], ahead=1))
                 for p in prefills for d in p.draws() if d.join]
        return tuple(rows)

    def _spec(self, req: Request, ahead: int = 0) -> SampleSpec:
        """The draw of `req`'s next output token (`ahead` more if an earlier draw of this iteration precedes it)."""
        return sample_spec(req.prompt_token_ids, req.output_token_ids, req.params, req.seed,
                           self.outputs.eos_token_ids, ahead, req.grammar)

    # ---- the outcome ------------------------------------------------------------------------------------
    def _on_token(self, req: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        self.outputs.on_token(req, token, logprobs)
        if req.finished:
            self._end(req, req.finish_reason or "stop", req.error)

    def _end(self, req: Request, reason: FinishReason, error: str | None = None) -> None:
        """Bookkeeping for a request that has finished, failed or been aborted. Its row, if any, stays in
        `running` until retired (or freed at once by `abort`)."""
        self.outputs.finish(req, reason, error)
        req.grammar = None
        if self.requests.pop(req.request_id, None) is not None:
            self.queues.discard(req.request_id)

    # ---- what the controller sees -------------------------------------------------------------------------
    def _held_bytes(self, cache_bytes: int) -> int:
        """Device bytes the engine holds between steps: the batch cache window, the prefilled pool and the
        prefix cache."""
        return cache_bytes + self.queues.held_bytes()[0] + self._prefix_bytes()

    def _prefix_bytes(self) -> int:
        return self.prefixes.nbytes() if self.prefixes is not None else 0

    def _step_row_bytes(self, length: int) -> int:
        """Transient bytes one row adds during a decode step (activations, logits, attention scores)."""
        return self.step_bytes_per_row + 4 * self.cache.kv_heads * (length + 1)

    def _read_memory(self, retire: list[str]) -> MemoryReading | None:
        """The iteration's one probe reading, of what the engine holds once `retire` has left.

        A real probe (NVML, torch, host RSS) sees the whole preallocated cache buffer as used. Its unused
        headroom is the engine's own reserve, reused as rows grow; counting it would make the controller
        preempt rows whose removal can never lower the reading."""
        if self.probe is None:
            return None
        rows, length = self.cache.rows - len(retire), self.cache.length_without(retire)
        window = rows * length * self.cache.bytes_per_token
        reading = self.probe.read(engine_bytes=self._held_bytes(window), iteration=self.iteration)
        if not self.probe.sees_whole_cache:
            return reading
        headroom = self.cache.reserved_bytes() - window
        return replace(reading, used_bytes=max(0, reading.used_bytes - headroom))

    def _snapshot(self, retire: list[str], memory: MemoryReading | None) -> CapacitySnapshot:
        rows = tuple(
            RowInfo(rid, q.priority, q.arrival, self.cache.real[r], q.remaining, q.preemptions)
            for r, rid in enumerate(self.cache.ids) if rid not in retire
            for q in (self.running[rid],)
        )
        length = self.cache.length_without(retire)
        return CapacitySnapshot(
            iteration=self.iteration, max_rows=self.config.max_batch_size, rows=rows,
            candidates=self._candidates(len(rows)), waiting=len(self.queues.waiting), batch_length=length,
            bytes_per_token=self.cache.bytes_per_token, step_bytes_per_row=self._step_row_bytes(length),
            swapped_bytes=self.queues.held_bytes()[1], memory=memory, reclaimable_bytes=self._prefix_bytes(),
        )

    def _candidates(self, batch_rows: int) -> tuple[QueuedInfo, ...]:
        """Who may join the batch this iteration under the policy."""
        if not self.policy.retire_at_once and batch_rows:
            return ()  # run to completion: a new batch forms only once the old one has drained
        ids = list(self.queues.swapped) + list(self.queues.pool)
        if self.policy.join != "from_pool":
            ids += list(self.queues.waiting)
        return tuple(queued_info(self.requests[i]) for i in ids)


def _prefix_cache(config: EngineConfig, policy: Policy) -> PrefixCache | None:
    """The prefix cache, when it is on and the policy prefills prompts alone (static and orca compute them
    inside the batch forward, where no prefix can be skipped)."""
    if not config.prefix_caching or policy.join == "in_batch":
        return None
    return PrefixCache(config.prefill_chunk_tokens, config.prefix_cache_max_tokens)
