"""Requests, their sampling parameters, their lifecycle, and the outputs the engine streams back."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from configs.errors import FieldError
from engine.grammar import CONSTRAINT_FIELDS, GrammarMatcher, grammar_of

FinishReason = Literal["stop", "length", "abort", "error"]

# Below this temperature decoding is greedy. At T = 1e-5 a logit gap of 1e-3 already scales to 100 (the
# runner-up is e^-100 times less likely), so the cut-off changes no meaningful distribution.
MIN_TEMPERATURE = 1e-5

# The most alternatives a request may ask to see beside each sampled token (OpenAI's and vLLM's limit).
MAX_LOGPROBS = 20

# OpenAI's limits: presence and frequency penalties in [-2, 2]; logit_bias values in [-100, 100], 300 entries.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Validated on construction (`FieldError` naming the field)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: the engine derives one (still reproducible within a run)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with its top k alternatives
    # None: none; k: every prompt token's logprob (but the first's) with its top k alternatives, computed by the
    # request's first prefill and returned once, with its first output (vLLM's `prompt_logprobs`).
    prompt_logprobs: int | None = None
    # Logit adjustments, applied to the raw logits before temperature, top-k and top-p, in vLLM's order:
    # min_tokens, logit_bias, then the penalties (engine/sampler.py:adjust_logits). Defaults are off.
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence of a token in the output
    repetition_penalty: float = 1.0  # vLLM: a token of prompt or output has a positive logit / p, a negative * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), by id; a mapping is accepted
    min_tokens: int = 0  # vLLM: EOS and stop_token_ids cannot be drawn before this many output tokens
    # Structured output, at most one (engine/grammar.py): the output matches it, and ends ("stop") once the
    # match is complete. Each is checked to compile (FieldError naming the field).
    json_schema: str | None = None  # a JSON schema, as JSON text (a dict is accepted); '{"type": "object"}': any object
    regex: str | None = None  # a regular expression the whole output matches
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but keep the object hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise FieldError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise FieldError("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise FieldError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise FieldError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise FieldError("seed", f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise FieldError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise FieldError("stop_token_ids", f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
                raise FieldError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {lp!r}")
        self._check_adjustments()
        self._check_constraint()

    def _check_constraint(self) -> None:
        if isinstance(self.json_schema, Mapping):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise FieldError(given[1], f"give at most one of {', '.join(CONSTRAINT_FIELDS)}; got {' and '.join(given)}")
        if not given:
            return
        name, value = given[0], getattr(self, given[0])
        if name == "choice":
            if not isinstance(value, tuple) or not value or not all(isinstance(c, str) and c for c in value):
                raise FieldError(name, f"choice must be a non-empty list of non-empty strings, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise FieldError(name, f"{name} must be a non-empty string, got {value!r}")
        if self.grammar is None:  # compiled here, once: a FieldError naming the field if it cannot be
            raise AssertionError(f"{name} gave no grammar")

    @property
    def constraint_field(self) -> str | None:
        """The field holding this request's structured-output constraint; None: unconstrained."""
        return next((name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None), None)

    @cached_property
    def grammar(self) -> str | None:
        """llguidance's grammar text for the constraint (None: unconstrained), built once, on construction."""
        name = self.constraint_field
        return None if name is None else grammar_of(name, getattr(self, name))

    def _check_adjustments(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise FieldError(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not 0.0 < rp < math.inf:
            raise FieldError("repetition_penalty", f"repetition_penalty must be a finite number > 0, got {rp!r}")
        mt = self.min_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or not 0 <= mt <= self.max_tokens:
            raise FieldError("min_tokens",
                             f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {mt!r}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """FieldError naming `logit_bias` if it biases a token id outside [0, vocab_size)."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise FieldError("logit_bias", f"logit_bias token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or below `MIN_TEMPERATURE` (dividing logits by 1e-310 overflows them to inf)."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def counts_tokens(self) -> bool:
        """A penalty is on: each draw depends on the tokens seen so far (the output; the prompt too for
        `repetition_penalty`)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_real(v: object) -> bool:
    """An int or float (not a bool) that is not NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _logit_bias_pairs(bias: Mapping[int, float] | tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """`bias` as (token id, bias) pairs sorted by id, validated (FieldError naming `logit_bias`)."""
    if not isinstance(bias, (Mapping, tuple, list)):
        raise FieldError("logit_bias", f"logit_bias must map token ids to biases, got {bias!r}")
    pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise FieldError("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(pairs)}")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FieldError("logit_bias", f"logit_bias entries must be (token id, bias) pairs, got {pair!r}")
        tok, b = pair
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise FieldError("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
        if not _is_real(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise FieldError("logit_bias",
                             f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {b!r} for token {tok}")
        if tok in out:
            raise FieldError("logit_bias", f"logit_bias names token {tok} twice")
        out[tok] = float(b)
    return tuple(sorted(out.items()))


def _outside_vocab(ids: Sequence[int], vocab_size: int) -> list[int]:
    return [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]


def check_token_ids(prompt_ids: Sequence[int], params: SamplingParams, resume_token_ids: Sequence[int],
                    vocab_size: int, max_model_len: int) -> None:
    """The checks of a request's token ids against the model's vocabulary and context (FieldError naming the
    field). Pure, so the ingress runs the same checks as the engine before anything is streamed."""
    if not prompt_ids:
        raise FieldError("prompt_token_ids", "prompt_token_ids must not be empty")
    bad = _outside_vocab(prompt_ids, vocab_size)
    if bad:
        raise FieldError("prompt_token_ids", f"prompt_token_ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise FieldError(
            "prompt",
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
            f"{len(prompt_ids) + params.max_tokens} exceeds the model's context length ({max_model_len})"
        )
    bad_stop = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise FieldError("stop_token_ids", f"stop_token_ids {bad_stop} outside the vocabulary (size {vocab_size})")
    params.check_vocabulary(vocab_size)
    bad = _outside_vocab(resume_token_ids, vocab_size)
    if bad:
        raise FieldError("resume_token_ids", f"resume_token_ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if len(resume_token_ids) >= params.max_tokens:
        raise FieldError("resume_token_ids", f"{len(resume_token_ids)} tokens to resume after leave nothing to "
                         f"generate (max_tokens {params.max_tokens})")


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued for prefill (also: preempted by recompute)
    PREFILLED = "prefilled"  # KV ready in the prefilled pool
    RUNNING = "running"  # a row of the decode batch
    SWAPPED = "swapped"  # preempted, KV on host memory
    FINISHED = "finished"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability under the model's raw logits (log_softmax before temperature,
    top-k or top-p, as vLLM reports by default), with the `SamplingParams.logprobs` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    """What one request gained in one step. `text` is the new text only (a delta), never split mid-character."""

    request_id: str
    new_token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # on the last output
    error: str | None = None  # set when finish_reason == "error"
    # One per new token id, in order, when the request asked for logprobs; None when it did not.
    logprobs: list[TokenLogprobs] | None = None
    # With `SamplingParams.prompt_logprobs`, once: on the output carrying the first token (for a choice of n
    # (engine/choices.py) drawn later than choice 0, on an output before it): one per prompt token, the first
    # None (nothing precedes it), then token i's logprob given tokens [0, i).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    index: int = 0  # which of the request's n choices this is (engine/choices.py); `finished`: that choice's end


@dataclass
class Request:
    """Engine-side state of one request. Progress is the token list; everything else derives from it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival: int  # engine-wide order of arrival
    seed: int
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Structured output: where the request is in its grammar (None: unconstrained, or dropped with its KV by
    # a recompute preemption until it is prefilled again, or finished).
    grammar: GrammarMatcher | None = None
    # One of the n choices of a request (engine/choices.py): the id it was submitted as, and which choice.
    parent: str | None = None
    index: int = 0

    @property
    def output_id(self) -> str:
        """The id its outputs carry: the submitted request's (a choice's own id is the engine's)."""
        return self.parent if self.parent is not None else self.request_id

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED
