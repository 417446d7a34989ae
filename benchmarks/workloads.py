"""Seeded benchmark workloads: who asks for what, and when.

Every request carries random token ids as its prompt (drawn uniformly from the vocabulary above the first
100 ids, which hold the special tokens) and an exact output length: the systems ignore EOS, so each request
generates exactly `max_tokens` tokens everywhere and useful work is the same for every system.

* `anyscale` — all requests at once; prompts uniform in [16, 256] tokens; outputs exponential with mean 64,
  capped at 256 (at least 1). A scaled-down version of Anyscale's 2023 continuous-batching benchmark.
* `uniform` — all requests at once, every prompt and every output the same length: a sanity row where
  re-batching has nothing to win (no row ever finishes early).
* `poisson` — the `anyscale` lengths, arriving as a Poisson process at `rate` requests per second: for
  latency (time to first token, time per output token, end to end).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SPECIAL_IDS = 100  # token ids below this are left out of random prompts (special / control tokens)


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    prompt: list[int]  # token ids
    max_tokens: int  # exact output length (EOS ignored)
    arrival_s: float = 0.0  # seconds after the start of the run


@dataclass(frozen=True)
class LengthSpec:
    """How long prompts and outputs are. Scaled down as a whole for the tiny smoke model."""

    prompt_len: tuple[int, int] = (16, 256)  # uniform, inclusive
    output_mean: float = 64.0  # exponential mean
    output_cap: int = 256
    uniform_prompt_len: int = 128  # the `uniform` workload's fixed lengths
    uniform_output_len: int = 64


FULL_LENGTHS = LengthSpec()
SMOKE_LENGTHS = LengthSpec(prompt_len=(4, 32), output_mean=8.0, output_cap=24, uniform_prompt_len=16,
                           uniform_output_len=8)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[BenchRequest, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        """True when requests arrive over time (latency matters), False when all arrive at t=0."""
        return any(r.arrival_s > 0 for r in self.requests)

    @property
    def useful_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def summary(self) -> dict[str, Any]:
        prompts = [len(r.prompt) for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        return {
            "requests": len(self.requests),
            "prompt_tokens": {"mean": statistics.fmean(prompts), "min": min(prompts), "max": max(prompts)},
            "output_tokens": {"mean": statistics.fmean(outputs), "min": min(outputs), "max": max(outputs),
                              "total": sum(outputs)},
            "last_arrival_s": max(r.arrival_s for r in self.requests),
        }


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    lo = min(SPECIAL_IDS, vocab // 4)
    return [rng.randrange(lo, vocab) for _ in range(n)]


def _exp_output(rng: random.Random, lengths: LengthSpec) -> int:
    return max(1, min(lengths.output_cap, round(rng.expovariate(1.0 / lengths.output_mean))))


def anyscale(n: int, vocab: int, seed: int, lengths: LengthSpec = FULL_LENGTHS, **_: Any) -> Workload:
    rng = random.Random(seed)
    reqs = tuple(BenchRequest(f"req{i}", _prompt(rng, rng.randint(*lengths.prompt_len), vocab),
                              _exp_output(rng, lengths)) for i in range(n))
    lo, hi = lengths.prompt_len
    return Workload(
        "anyscale",
        f"{n} requests at t=0; prompts uniform {lo}-{hi} tokens; outputs exponential mean "
        f"{lengths.output_mean:g}, capped at {lengths.output_cap}; random token-id prompts; seed {seed}",
        reqs, {"seed": seed, **asdict(lengths)},
    )


def uniform(n: int, vocab: int, seed: int, lengths: LengthSpec = FULL_LENGTHS, **_: Any) -> Workload:
    rng = random.Random(seed)
    p, t = lengths.uniform_prompt_len, lengths.uniform_output_len
    reqs = tuple(BenchRequest(f"req{i}", _prompt(rng, p, vocab), t) for i in range(n))
    return Workload("uniform", f"{n} requests at t=0; every prompt {p} tokens, every output {t} tokens; "
                    f"random token-id prompts; seed {seed}", reqs, {"seed": seed, "prompt_len": p, "output_len": t})


def poisson(n: int, vocab: int, seed: int, lengths: LengthSpec = FULL_LENGTHS, rate: float = 1.0,
            **_: Any) -> Workload:
    # Anyscale's distributions, its own draws: with anyscale's very prompts, a system that keeps one engine across
    # workloads (vLLM's offline LLM in benchmarks/vs_vllm.py, prefix caching on by default) found every poisson
    # prompt cached from the anyscale run, and its time to first token measured a cache hit, not a prefill.
    base = anyscale(n, vocab, seed + 2, lengths)
    rng = random.Random(seed + 1)
    t, reqs = 0.0, []
    for i, r in enumerate(base.requests):
        if i:  # the first request arrives at t=0, the rest after exponential gaps
            t += rng.expovariate(rate)
        reqs.append(BenchRequest(r.request_id, r.prompt, r.max_tokens, t))
    lo, hi = lengths.prompt_len
    return Workload(
        "poisson",
        f"{n} requests arriving as a Poisson process at {rate:g}/s; anyscale lengths (prompts {lo}-{hi}, "
        f"outputs exponential mean {lengths.output_mean:g} capped at {lengths.output_cap}); seed {seed}",
        tuple(reqs), {**base.params, "rate_per_s": rate},
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {"anyscale": anyscale, "uniform": uniform, "poisson": poisson}
