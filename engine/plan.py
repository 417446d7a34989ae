"""The typed hand-offs of one iteration (docs/architecture.md, "One iteration").

    plan    = scheduler.schedule()            # IterationPlan: who leaves, who joins, what is computed
    result  = runner.execute(plan, cache)     # StepResult: the tokens sampled, the KV that left the batch
    outputs = scheduler.update(plan, result)  # list[RequestOutput]: tokens appended, stops checked

(With `BatonEngine.step(emit=...)` the last hand-off comes in two parts, the prefills' outputs before the batch
forward: `execute(..., after_prefills)`, `update_prefills`, `update_batch`.)

Both objects are plain frozen data: a test can build a plan by hand, run it, and print the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from autoscaler.probes.base import MemoryReading
from engine.capacity import Preemption
from engine.grammar import GrammarMatcher
from engine.kv_cache import RowKV
from engine.request import SamplingParams, TokenLogprobs


@dataclass(frozen=True)
class SampleSpec:
    """How to draw one token of one request. The draw depends only on (seed, index) and the request's own
    tokens, never on the batch.

    `prompt_ids`, `output_ids` and `suppressed` feed the logit adjustments (engine/sampler.py:adjust_logits)
    and stay empty for a request without them, so its draw costs nothing more. `grammar` is the request's
    structured-output matcher (engine/grammar.py), shared with the request: the runner masks the draw with it
    and advances it with the token drawn, so a later draw of the same iteration (a baton join's batch row,
    after its prefill's) sees that token.
    """

    params: SamplingParams
    seed: int
    index: int  # which of the request's output tokens this draw produces (0 = the first)
    prompt_ids: tuple[int, ...] = ()  # the prompt, when repetition_penalty counts its tokens
    output_ids: tuple[int, ...] = ()  # when a penalty is on: the output before this draw (len == index)
    suppressed: tuple[int, ...] = ()  # ids this draw may not produce (min_tokens: EOS, stop_token_ids)
    grammar: GrammarMatcher | None = None  # structured output: only the tokens it allows may be drawn

    @property
    def top_logprobs(self) -> int | None:
        """How many top alternatives to report with the token's logprob; None: no logprobs for this draw."""
        return self.params.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        """How many top alternatives to report with each prompt token's logprob; None: none for this draw.

        Only the draw of the first output token (index 0) computes them: that draw's forward is the
        request's first computation of its prompt (a prefill, or a static/orca prompt joining the batch). A
        recompute preemption or a failover continuation re-prefills with output tokens already drawn (index >
        0), so the prompt logprobs, delivered with the first token, are never computed or sent twice."""
        return self.params.prompt_logprobs if self.index == 0 else None

    @property
    def adjusts_logits(self) -> bool:
        """The draw changes the raw logits before sampling (a penalty, a bias or suppressed ids)."""
        return bool(self.params.counts_tokens or self.params.logit_bias or self.suppressed)

    def after(self, token: int) -> SampleSpec:
        """This draw once `token`, drawn earlier in the same iteration (a baton join's prefill), is known."""
        if not self.params.counts_tokens:
            return self
        return replace(self, output_ids=(*self.output_ids, token))


def sample_spec(prompt: list[int], output: list[int], params: SamplingParams, seed: int, eos_token_ids: set[int],
                ahead: int = 0, grammar: GrammarMatcher | None = None) -> SampleSpec:
    """The draw of output token `len(output) + ahead` (`ahead` = 1: an earlier draw of the same iteration,
    not in `output` yet, precedes it; the runner completes `output_ids` with `SampleSpec.after`)."""
    index = len(output) + ahead
    suppressed: tuple[int, ...] = ()
    if index < params.min_tokens:
        eos = () if params.ignore_eos else tuple(sorted(eos_token_ids))
        suppressed = (*params.stop_token_ids, *eos)
    return SampleSpec(
        params, seed, index,
        prompt_ids=tuple(prompt) if params.repetition_penalty != 1 else (),
        output_ids=tuple(output) if params.counts_tokens else (),
        suppressed=suppressed,
        grammar=grammar,
    )


@dataclass(frozen=True)
class Draw:
    """One request's next token drawn from a prefill's last logits, and where its copy of the KV goes."""

    request_id: str
    sample: SampleSpec
    join: bool  # True: its KV takes a row of the batch at once (baton); False: it goes to the prefilled pool


@dataclass(frozen=True)
class Prefill:
    """One request's tokens (its prompt, plus what it generated before a recompute preemption) computed
    alone, without padding, and its next token sampled.

    `siblings`: other choices of the same request (engine/choices.py) whose tokens are exactly these. The
    tokens are computed once; each sibling draws from the same last logits with its own `SampleSpec` and
    takes its own copy of the KV (a row, or a pool entry, each counted by the capacity controller).

    With a `prefix` (from the prefix cache, engine/prefix_cache.py), only the tokens after it are computed, on
    top of its KV; the KV returned covers all `token_ids` either way (prefill on top of existing KV)."""

    request_id: str
    token_ids: tuple[int, ...]
    sample: SampleSpec
    join: bool  # True: its KV takes a row of the batch at once (baton); False: it goes to the prefilled pool
    siblings: tuple[Draw, ...] = ()
    prefix: RowKV | None = None  # KV of token_ids[:cached_tokens], [layers, kv_heads, cached_tokens, head_dim]
    looked_up: bool = False  # the prefix cache was asked for these tokens (the hit rate's denominator)
    # Chunked across iterations: compute only token_ids[:until] (a chunk boundary) and draw nothing; the KV
    # waits in the scheduler's queues and is the next iteration's `prefix` for these tokens. None: all of them.
    until: int | None = None

    @property
    def prompt_logprobs(self) -> int | None:
        """Not None: this prefill computes the logits of every position (not only the last), for the prompt
        logprobs (top k = the value). Such a prefill must compute every position itself: a prefix cache must not
        serve any part of it. Of a request's n choices only choice 0 asks (engine/choices.py), so a prefill its
        siblings share computes them once, whichever draw leads it; the request's id keys them in the result."""
        return next((d.sample.prompt_logprobs for d in self.draws() if d.sample.prompt_logprobs is not None), None)

    @property
    def cached_tokens(self) -> int:
        """Leading tokens whose KV is given (the prefix cache's, or this request's own earlier chunks)."""
        return self.prefix.length if self.prefix is not None else 0

    @property
    def computed_tokens(self) -> int:
        """Tokens this prefill computes."""
        return (len(self.token_ids) if self.until is None else self.until) - self.cached_tokens

    def draws(self) -> tuple[Draw, ...]:
        """Every draw from this prefill's logits: the request's own, then its siblings' (none for a chunk that
        stops short of the last token)."""
        if self.until is not None:
            return ()
        return (Draw(self.request_id, self.sample, self.join), *self.siblings)


@dataclass(frozen=True)
class Join:
    """A request taking a row of the batch, after this iteration's retirements and preemptions."""

    request_id: str
    kv: RowKV | None  # from the prefilled pool or swapped back in; None: its prompt rides in the batch forward


@dataclass(frozen=True)
class BatchRow:
    """One row of the batch forward.

    `feed` is what the row computes: its newest token (a decode step), or its whole prompt (a static/orca
    join, left-padded to the widest such prompt). None means "the token its own prefill samples in this
    iteration" (a baton join), which the runner fills in.
    """

    request_id: str
    feed: tuple[int, ...] | None
    sample: SampleSpec | None  # None: a finished row kept by run-to-completion, computed but not sampled


@dataclass(frozen=True)
class IterationPlan:
    """What the scheduler decided for one iteration. The runner applies it in field order."""

    iteration: int
    capacity: int  # rows the capacity controller allows after this iteration's admissions
    retire: tuple[str, ...] = ()  # finished rows leaving the batch first
    preempt: tuple[Preemption, ...] = ()  # rows leaving for host memory (swap) or the waiting queue (recompute)
    join: tuple[Join, ...] = ()  # rows embedded from the pool, from host, or empty for an in-batch prompt
    prefill: tuple[Prefill, ...] = ()  # prompts computed alone, in order (baton joins are embedded after)
    batch: tuple[BatchRow, ...] = ()  # every row of the batch after the changes above; empty: no batch forward
    memory: MemoryReading | None = None  # the iteration's one probe reading (None: fixed controller)
    refused_for_memory: int = 0  # candidates that fit by rows but not by memory
    controller_s: float = 0.0  # time spent reading the probe and deciding

    def in_batch_joins(self) -> set[str]:
        """Requests whose prompt rides inside this iteration's batch forward (static and orca joins)."""
        return {j.request_id for j in self.join if j.kv is None}


@dataclass(frozen=True)
class BatchShape:
    """What the batch forward computed, for the statistics."""

    rows: int  # rows computed
    width: int  # input positions per row (1 for a pure decode step)
    attended_columns: int  # rows x cache columns attended
    padded_columns: int  # of which padding


@dataclass(frozen=True)
class StepResult:
    """What executing a plan produced."""

    prefill_tokens: dict[str, int] = field(default_factory=dict)  # each prefill's sampled token
    pooled: dict[str, RowKV] = field(default_factory=dict)  # KV of prefills bound for the pool
    prefilled: dict[str, RowKV] = field(default_factory=dict)  # every prefill's KV (for the prefix cache)
    batch_tokens: dict[str, int] = field(default_factory=dict)  # each sampled batch row's token
    # The logprobs of those tokens, only for the requests that asked (SampleSpec.top_logprobs is not None).
    prefill_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    batch_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # The prompt logprobs of the requests whose first token was drawn now and that asked for them
    # (SampleSpec.prompt_logprobs is not None): one per prompt token, the first None.
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    swapped: dict[str, RowKV] = field(default_factory=dict)  # host KV of rows preempted by swap
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why its forward pass failed
    batch: BatchShape | None = None  # None: no batch forward ran
    prefill_computed: int = 0  # tokens computed by the prefills that ran (their cached prefixes not included)
    forward_s: float = 0.0  # time inside model forward passes
    cache_columns: int = 0  # window length L after the step
