"""Per-request sampling: greedy, or temperature / top-k / top-p with a per-request seed.

The random draw for a request's i-th output token depends only on (seed, i), so the same request gives the
same tokens whatever shares its batch, whenever it joined, and even if it was preempted and recomputed.

Before the draw, `adjust_logits` applies a request's logit adjustments to its raw logits, in vLLM's order:
min_tokens (suppressed ids to -inf), logit_bias, repetition, frequency and presence penalties. They are
computed at the ids each row names or has seen, batched over the rows (token counts by one `unique` of the
rows' ids), from each row's own tokens only: so they are batch-invariant too. Rows without adjustments
take the logits as they are.

Then `mask_disallowed` sets to -inf, in each row with a structured-output grammar, every token its grammar
does not allow next (engine/grammar.py); a row's mask comes from its own matcher only, so it is
batch-invariant too. Both come before temperature, top-k and top-p, so they shape what is drawn; logprobs are
still reported from the raw logits.

Numerics: a temperature below `engine.request.MIN_TEMPERATURE` is greedy (`SamplingParams.greedy`):
dividing by 1e-310 overflows the logits to inf and the probabilities to NaN. Above it, the largest logit is
subtracted before scaling, so the scaled logits are <= 0 and softmax stays finite. Logits that are NaN are
a model or device fault: the sampler raises `NonFiniteLogitsError` rather than turn them into a token.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from engine import cpu_kernel
from engine.request import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from engine.plan import SampleSpec

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) pairs over the 64-bit seed space


class NonFiniteLogitsError(ValueError):
    """Logits with NaN in them: no token can be chosen honestly from this row (`rows` are batch indices)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"logits of batch row(s) {rows} contain NaN: no token can be sampled from them")
        self.rows = rows


def draw_uniform(seed: int, index: int) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, index)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * _MIX + index) & 0x7FFF_FFFF_FFFF_FFFF)
    return float(torch.rand((), generator=g, dtype=torch.float64))


def nan_rows(logits: torch.Tensor) -> torch.Tensor:
    """[rows] bool: which rows of `logits` ([V] or [rows, V]) hold NaN. A row's sum is NaN exactly when it
    holds a NaN (or both infinities, which is as broken); one reduction, ~20x cheaper than `isnan().any()`
    at 16 rows of a 49k vocabulary (0.05 against 0.9 ms on 2 CPU cores)."""
    return logits.reshape(-1, logits.shape[-1]).sum(dim=-1).isnan()


def _check_finite(logits: torch.Tensor) -> None:
    """Raise `NonFiniteLogitsError` naming the rows of `logits` ([V] or [rows, V]) that hold NaN."""
    bad = nan_rows(logits)
    if bool(bad.any()):
        raise NonFiniteLogitsError(torch.nonzero(bad).flatten().tolist())


def adjust_logits(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> torch.Tensor:
    """`logits` [rows, V] with each row's adjustments applied (min_tokens, logit_bias, penalties), for
    sampling. `logits` itself when no row adjusts; else a copy (the raw logits stay as they are, for
    logprobs) in which the other rows hold their raw values.

    Every adjustment touches only ids a row names or has seen (its suppressed, bias, prompt and output ids):
    the values at those positions of the flattened rows are gathered once, adjusted in float64 and written
    back rounded once; no pass over the vocabulary but the one copy."""
    if not any(s.adjusts_logits for s in specs):
        return logits
    groups = ([s.suppressed for s in specs], [[t for t, _ in s.params.logit_bias] for s in specs],
              [s.prompt_ids for s in specs], [s.output_ids for s in specs])
    width = logits.shape[1]
    # One sort for everything: the positions touched (sorted, unique) and, for each id of each group, its
    # index among them.
    positions = _positions([ids for g in groups for ids in g], len(specs), width)
    touched, where = (t.to(logits.device) for t in torch.unique(positions, return_inverse=True))
    suppressed, biased, prompt, output = where.split([sum(map(len, g)) for g in groups])
    out = logits.clone(memory_format=torch.contiguous_format)
    flat = out.view(-1)  # position r * V + id
    v = flat[touched].to(torch.float64)  # [k]: the values adjusted, in the order of `touched`
    v[suppressed] = float("-inf")
    v[biased] += torch.tensor([b for s in specs for _, b in s.params.logit_bias], dtype=v.dtype, device=v.device)
    if any(s.params.counts_tokens for s in specs):
        counts = torch.bincount(output, minlength=len(v)).to(v.dtype)
        _penalize(v, specs, touched // width, prompt, counts)
    # A huge division (repetition_penalty near 0) must not round to +inf: inf - inf is NaN in the softmax.
    flat[touched] = v.clamp(max=torch.finfo(logits.dtype).max).to(logits.dtype)
    return out


def mask_disallowed(logits: torch.Tensor, specs: Sequence[SampleSpec], own: bool = False) -> torch.Tensor:
    """`logits` [rows, V] with -inf at every token a row's grammar does not allow next. `logits` itself when
    no row has a grammar; else written in place if `own` (the caller's copy), otherwise a copy.

    Each matcher fills one row of a packed bitmask (int32 [n, ceil(V / 32)], bit t % 32 of word t // 32 =
    token t allowed), unpacked to booleans by one shift over all constrained rows: 0.3 ms a row, fill
    included, at a 49k vocabulary on this CPU (benchmarks/NOTES.md; a byte lookup table was slower)."""
    rows = [r for r, s in enumerate(specs) if s.grammar is not None]
    if not rows:
        return logits
    vocab = logits.shape[1]
    words = torch.full((len(rows), (vocab + 31) // 32), 0, dtype=torch.int32)  # [n, W], CPU: the matchers write it
    for i, r in enumerate(rows):
        grammar = specs[r].grammar
        assert grammar is not None
        grammar.fill_mask(words[i])
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [n, W, 32]
    allowed = bits.view(len(rows), -1)[:, :vocab].bool().to(logits.device)  # [n, V]
    out = logits if own else logits.clone(memory_format=torch.contiguous_format)
    index = torch.tensor(rows, device=logits.device)
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def _positions(lists: Sequence[Sequence[int]], batch: int, width: int) -> torch.Tensor:
    """[total]: the position r * width + id, in the flattened rows, of every id in `lists[j]`, whose row r is
    j % batch (the lists are groups of one list per batch row, concatenated)."""
    lengths = torch.tensor([len(ids) for ids in lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lists)) % batch, lengths)
    # Through array('q'): converting the ints in C is ~4x faster than torch.tensor on a list of them.
    ids = [torch.frombuffer(array("q", x), dtype=torch.int64) for x in lists if x]
    return rows * width + (torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64))


def _penalize(v: torch.Tensor, specs: Sequence[SampleSpec], rows: torch.Tensor, prompt: torch.Tensor,
              counts: torch.Tensor) -> None:
    """In place on the gathered values `v` [k] (position j in batch row `rows[j]`, in the row's output
    `counts[j]` times; `prompt`: the indices of the prompt's ids): repetition (prompt and output), frequency
    and presence (output) penalties, in vLLM's order. A position neither seen nor counted, or a row whose
    penalty is off, gets the neutral value (1, 0, 0): an exact no-op."""
    assert all(len(s.output_ids) == s.index for s in specs if s.params.counts_tokens), "the output before the draw"
    column = [[s.params.repetition_penalty, s.params.frequency_penalty, s.params.presence_penalty] for s in specs]
    repetition, frequency, presence = torch.tensor(column, dtype=v.dtype, device=v.device)[rows].T  # each [k]
    in_output = counts > 0
    if bool((repetition != 1).any()):
        seen = in_output.clone()
        seen[prompt] = True
        scale = torch.where(seen, repetition, 1.0)
        v.copy_(torch.where(v > 0, v / scale, v * scale))
    v -= frequency * counts
    v -= presence * in_output


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [V] (float64) after temperature, top-k and top-p; one-hot on the argmax when greedy."""
    _check_finite(logits)
    x = logits.to(torch.float64)
    if params.greedy:
        return torch.zeros_like(x).scatter_(0, x.argmax().reshape(1), 1.0)
    x = (x - x.max()) / params.temperature  # every value <= 0, the best exactly 0: no overflow
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of strictly more likely tokens
        drop = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample_one(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """Sample a token from `logits` [V] for a request's `index`-th output token."""
    probs = filtered_probs(logits, params)
    if params.greedy:
        return int(probs.argmax())
    u = draw_uniform(seed, index)
    cdf = torch.cumsum(probs, 0)
    tok = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)).item())
    tok = min(tok, probs.numel() - 1)
    while probs[tok] == 0 and tok > 0:  # never land on a filtered token through rounding at the edge
        tok -= 1
    return tok


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of [rows, V], the same indices (the first maximum; a NaN counts as the maximum): on CPU
    float32 through the compiled two-pass scan where it builds (`baton_captured::argmax_rows`, ~4x faster than ATen's
    reduction on a decode step's 16 x 49,152 logits), else ATen's."""
    if (logits.dim() == 2 and logits.dtype is torch.float32 and logits.device.type == "cpu" and logits.shape[1] > 0
            and logits.is_contiguous() and cpu_kernel.captured_llama() is not None):
        return torch.ops.baton_captured.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], indices: list[int]) -> list[int]:
    """One token per row of `logits` [rows, V]. Greedy rows share one argmax over the batch."""
    _check_finite(logits)
    out = argmax_rows(logits).tolist()
    for r, p in enumerate(params):
        if not p.greedy:
            out[r] = sample_one(logits[r], p, seeds[r], indices[r])
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprobs]:
    """Each row's chosen token's log-probability and its `top[r]` most likely tokens, from the raw
    `logits` [rows, V] the token was drawn from (log_softmax in float64; no temperature, no filtering).

    One log_softmax and one topk over the whole [rows, V]; the loop runs over rows, never over the vocabulary.
    """
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [rows, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()  # [rows]
    k = min(max(top), logp.shape[-1])
    values, ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # [rows, k]
    values_l, ids_l = values.tolist(), ids.tolist()
    return [
        TokenLogprobs(tok, lp, tuple(zip(ids_l[r][: top[r]], values_l[r][: top[r]], strict=True)))
        for r, (tok, lp) in enumerate(zip(tokens, chosen, strict=True))
    ]
