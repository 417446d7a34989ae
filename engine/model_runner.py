"""The model runner: executes an iteration's plan over an unmodified transformers causal LM.

`execute(plan, cache)` applies the plan's cache changes, runs its forward passes and samples every token
(one sampling entry point for prefill and decode), and returns a `StepResult`. Three kinds of pass:
* `prefill(ids)`: one request alone, batch 1, no padding; returns its KV (for the prefilled pool) and the
  logits of its last position (of every position for a request that asked for prompt logprobs,
  engine/prompt_logprobs.py).
* `prefill_packed(prompts)`: bfloat16 on AMX (`packs`), an iteration's whole one-chunk prompts end to end in one
  forward, each attending to its own tokens (engine/attention.py); each gets exactly `prefill`'s KV and logits.
* `batch_forward(cache, ...)`: the decode batch. The model sees our left-padded `BatchKVCache` through a
  `transformers.Cache` adapter, a 4-D boolean mask we build ourselves (padding + causality), and per-row
  position ids, so every row computes exactly what it would alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from engine import cpu_kernel
from engine.attention import EngineAttention
from engine.captured import CapturedLlama, PromptKernel, layer_linears
from engine.kv_cache import BatchKVCache, RowKV, attention_width
from engine.narrow_linear import (
    AMX_PACKED_OP,
    AVX512_OP,
    MAX_ROWS_BF16,
    KernelName,
    NarrowLinear,
    RowKernel,
    amx_linear,
    lanes_decode_kernel,
    lanes_op,
    lanes_packs,
    lanes_prompt_kernel,
    lanes_weight,
    packed_weight,
    resolve_kernel,
    row_kernel_op,
    tiles_fit,
)
from engine.plan import BatchRow, BatchShape, IterationPlan, Prefill, SampleSpec, StepResult
from engine.prompt_logprobs import last_position_alone, prompt_logprobs
from engine.request import TokenLogprobs
from engine.sampler import adjust_logits, mask_disallowed, nan_rows, sample, token_logprobs
from engine.thread_tuner import ThreadTuner
from engine.threads import ComputeThreads

log = logging.getLogger(__name__)


class _ShapedLayer(CacheLayerMixin):
    """One layer of the adapter: writes the step's new columns in place and returns views, no concatenation."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: BatchKVCache, layer: int) -> None:
        super().__init__()
        self.cache, self.layer, self.is_initialized = cache, layer, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [rows, kv_heads, T, head_dim] for the T new columns of this step
        self.cache.write_layer(self.layer, key_states, value_states)
        return self.cache.layer_view(self.layer, extra=key_states.shape[2], aligned=True)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return attention_width(self.cache.length + query_length), 0

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return -1


class ShapedCacheAdapter(Cache):
    """Presents a `BatchKVCache` to transformers as a `Cache` (the tuple format is gone in transformers 5)."""

    def __init__(self, cache: BatchKVCache) -> None:
        super().__init__(layers=[_ShapedLayer(cache, i) for i in range(cache.num_layers)])


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int


def model_shape(config: Any) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        max_position_embeddings=getattr(config, "max_position_embeddings", 2048),
    )


def build_step_mask(cache_mask: torch.Tensor, cache_len: int) -> torch.Tensor:
    """4-D boolean mask [rows, 1, T, L+T] (True = attend) from the 2-D mask [rows, L+T] of the step.

    Query t (column L+t) sees real columns up to its own. A padded query with nothing to see (a joining row's
    left padding) attends to itself, so it stays finite; its output and KV are discarded.
    """
    rows, width = cache_mask.shape
    t = width - cache_len
    if t == 1:
        return cache_mask[:, None, None, :]
    cols = torch.arange(width, device=cache_mask.device)
    causal = cols[None, :] <= (cache_len + torch.arange(t, device=cache_mask.device))[:, None]  # [T, L+T]
    allowed = cache_mask[:, None, :] & causal[None, :, :]  # [rows, T, L+T]
    empty = ~allowed.any(dim=-1)  # [rows, T]
    if bool(empty.any()):
        diag = torch.zeros_like(allowed)
        diag[:, torch.arange(t), cache_len + torch.arange(t)] = True
        allowed = allowed | (diag & empty[:, :, None])
    return allowed[:, None, :, :]


@dataclass
class Sampled:
    """The tokens drawn from one set of logits, and their logprobs for the requests that asked."""

    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)  # prefills that asked


class ModelRunner:
    """Owns the model; times every forward pass."""

    def __init__(self, model: Any, device: torch.device, narrow_linear: bool = True,
                 narrow_kernel: KernelName = "auto", tuner: ThreadTuner | None = None, prefill_chunk: int = 256,
                 attention_kernel: bool = True, packed_prefill: bool = True, captured_forward: bool = True,
                 work_sharing: bool = True) -> None:
        self.model, self.device = model, device
        self.prefill_chunk = prefill_chunk  # prompts are computed in chunks ending at its multiples
        self.tuner = tuner  # CPU: picks the decode steps' thread count by measuring (engine/thread_tuner.py)
        self.shape = model_shape(model.config)
        self.forward_s = 0.0  # cumulative; the engine reads deltas
        # CPU: the decode batch's linears through a kernel fast for a few rows (engine/narrow_linear.py).
        self.narrow = NarrowLinear.install(model) if narrow_linear and device.type == "cpu" else None
        self.narrow_kernel: str = "off"  # which kernel the decode batch's linears use: off, compiled, transposed
        self._row_kernel: RowKernel | None = None
        if self.narrow is not None:
            self.narrow_kernel, self._row_kernel = resolve_kernel(narrow_kernel, many_rows=packed_prefill)
        log.info("decode batch's linear layers: %s",
                 "F.linear" if self.narrow_kernel == "off" else f"the {self.narrow_kernel} kernel")
        # CPU: the batch forward's attention over each row's real columns only, and packed prompts each over its
        # own tokens (engine/attention.py).
        self.attention = EngineAttention.install(model) if device.type == "cpu" else None
        self.attention_kernel = bool(attention_kernel and self.attention and self.attention.kernel)
        log.info("batch forward's attention: %s", "the compiled kernel" if self.attention_kernel else "SDPA")
        # Prompts' linears through a row-invariant kernel where there is one, so several prompts can share one
        # prefill forward and each get its solo bits (`prefill_packed`): bfloat16 on AMX (the decode batch's kernel,
        # only where every layer weight fits the tiles: one left to F.linear would give a prompt other bits packed
        # than alone), else its lanes where they beat F.linear (`lanes_prompt_kernel`: float32 off Intel, bfloat16
        # without AMX).
        self._prompt_kernel: RowKernel | None = None
        dtype = next(model.parameters()).dtype
        amx = False
        if packed_prefill and self.narrow is not None and self.narrow_kernel == "compiled":
            if cpu_kernel.amx_in_use() and dtype is torch.bfloat16 \
                    and all(tiles_fit(w) and w.is_contiguous() for w in layer_linear_weights(model)):
                self._prompt_kernel, amx = amx_linear, True
            elif all(m.weight.is_contiguous() for m in model.modules()
                     if type(m) is torch.nn.Linear):  # the output embedding's too
                self._prompt_kernel = lanes_prompt_kernel(dtype)
        self.packs = self._prompt_kernel is not None and self.attention is not None
        packed = pack_layer_weights(model) if amx else 0
        # The decode batch through the prompts' lanes copies where they are the AVX-512 kernel's: faster there on
        # the few-rows shapes too, and a row's bits the same in a step as in a prompt (narrow_linear.lanes_decode_kernel).
        decode_lanes = lanes_decode_kernel(dtype) if self.packs and not amx else None
        if decode_lanes is not None:
            self._row_kernel = decode_lanes
        if self.packs and not amx:  # the prompts' weight copies, now, not on the first prompt
            lanes = sum(lanes_weight(m.weight).nbytes for m in model.modules()
                        if type(m) is torch.nn.Linear and lanes_packs(m.weight))
            log.info("prompts%s: %.0f MiB of weights packed for 16 outputs per vector",
                     " and decode steps" * (decode_lanes is not None), lanes / 2**20)
        log.info("prefill: %s", "one prompt per forward" if not self.packs else
                 f"prompts packed into one forward (AMX; {packed / 2**20:.0f} MiB of weights packed into tiles)" if amx
                 else f"prompts packed into one forward ({str(dtype).removeprefix('torch.')} through the "
                      f"{'AVX-512' if lanes_op() == AVX512_OP else 'AVX2'} kernel)")
        # CPU, a Llama-family model: pure decode steps and from-scratch prompts as compiled operators, bit for bit the
        # eager forward's with these kernels (engine/captured.py).
        self.captured: CapturedLlama | None = None
        if captured_forward and self.attention_kernel:
            op = row_kernel_op(self.narrow_kernel, dtype, lanes=decode_lanes is not None)
            prompt = PromptKernel()
            if self.packs and amx:  # the prompts' linears as amx_linear computes them
                prompt = PromptKernel(MAX_ROWS_BF16, AVX512_OP, AMX_PACKED_OP,
                                      tuple(packed_weight(w) for w in layer_linears(model)))
            elif self.packs:  # as lanes_prompt_kernel does: every row through the compiled kernel, with the weights
                # lanes copies where they pack
                prompt = PromptKernel(0, "", lanes_op(), tuple(lanes_weight(w) for w in layer_linears(model)),
                                      lanes_weight(model.lm_head.weight))
            built = CapturedLlama.build(model, *op, prompt_kernel=prompt, decode_lanes=decode_lanes is not None) \
                if op is not None \
                else "the transposed row kernel"
            self.captured = built if isinstance(built, CapturedLlama) else None
            log.info("decode steps and prompts: %s", f"captured (decode up to {self.captured.max_rows} rows, "
                     f"{'fused' if self.captured.fused_lanes else 'ATen'} norms and rotary, "
                     f"{self.captured.max_prompts} prompt(s) per prefill)" if self.captured
                     else f"the eager forward ({built})")
        # CPU: captured decode steps split their kernels' work through the pool where it pays (engine/threads.py).
        most = tuner.most if tuner is not None else torch.get_num_threads()
        self.threads = ComputeThreads.build(most, work_sharing and self.captured is not None)
        if self.threads.shared:
            log.info("decode steps%s: %d threads through the kernels' work-sharing pool", " and prompts" * self.packs,
                     most)
            if tuner is not None:
                tuner.pooled = True

    def execute(self, plan: IterationPlan, cache: BatchKVCache,
                after_prefills: Callable[[StepResult], None] | None = None) -> StepResult:
        """Apply `plan` to `cache` in its field order. A failed forward pass fails its requests, never the
        engine: they come back in `StepResult.failed`. `after_prefills`, if given, gets what the prefills
        produced (their tokens, KV and logprobs, and the swapped rows; nothing failed) before the batch forward
        runs, so their first tokens can go out a forward earlier; the result returned holds it all again."""
        with self.threads.iteration():
            return self._execute(plan, cache, after_prefills)

    def _execute(self, plan: IterationPlan, cache: BatchKVCache,
                 after_prefills: Callable[[StepResult], None] | None) -> StepResult:
        f0 = self.forward_s
        for rid in plan.retire:
            cache.remove(rid)
        swapped = {}
        for p in plan.preempt:
            if p.mode == "swap":
                swapped[p.request_id] = cache.extract(p.request_id).to("cpu")
            cache.remove(p.request_id)
        for j in plan.join:
            cache.insert(j.request_id, j.kv if j.kv is not None else RowKV.empty_like(cache))
        failed: dict[str, str] = {}
        prefilled: dict[str, RowKV] = {}
        with self._prompt_threads() if plan.prefill else contextlib.nullcontext():
            prefill, pooled = self._prefills(plan.prefill, cache, failed, prefilled)
        if after_prefills is not None and prefill.tokens:
            after_prefills(StepResult(prefill_tokens=prefill.tokens, pooled=pooled, prefilled=prefilled,
                                      prefill_logprobs=prefill.logprobs, prompt_logprobs=dict(prefill.prompt_logprobs),
                                      swapped=swapped))
        batch, shape = self._batch(plan.batch, prefill.tokens, cache, failed)
        prompts = {**prefill.prompt_logprobs, **self._in_batch_prompt_logprobs(plan.batch, batch.tokens, failed)}
        return StepResult(
            prefill_tokens=prefill.tokens, pooled=pooled, prefilled=prefilled, batch_tokens=batch.tokens,
            swapped=swapped, prefill_logprobs=prefill.logprobs, batch_logprobs=batch.logprobs,
            prompt_logprobs=prompts, failed=failed, batch=shape,
            prefill_computed=sum(p.computed_tokens for p in plan.prefill if p.request_id in prefilled),
            forward_s=self.forward_s - f0, cache_columns=cache.length,
        )

    def _prefills(self, prefills: tuple[Prefill, ...], cache: BatchKVCache, failed: dict[str, str],
                  prefilled: dict[str, RowKV]) -> tuple[Sampled, dict[str, RowKV]]:
        """Each prompt alone (on top of its cached prefix, if any); its first token sampled; its KV embedded at
        once (a baton join) or pooled, and filed in `prefilled` for the prefix cache."""
        sampled = Sampled()
        pooled: dict[str, RowKV] = {}
        packed = self._packed_prefills(prefills)
        for p in prefills:
            draws = p.draws()
            try:
                if p.until is not None:  # a chunk of a long prompt: its KV waits for the next iteration
                    prefilled[p.request_id], _ = self.prefill(list(p.token_ids[:p.until]), prefix=p.prefix)
                    continue
                every = p.prompt_logprobs is not None
                kv, logits = packed.get(p.request_id) or self.prefill(list(p.token_ids), prefix=p.prefix,
                                                                      every_position=every)
                if p.prompt_logprobs is not None:  # logits [P, V]: the prompt's, then the last draws
                    sampled.prompt_logprobs[p.request_id] = prompt_logprobs(logits, p.token_ids, p.prompt_logprobs)
                    logits = logits[-1]
            except Exception as e:
                log.exception("prefill of %s failed", p.request_id)
                failed.update((rid, f"prefill failed: {e}") for rid in [d.request_id for d in draws] or [p.request_id])
                continue
            # Siblings (other choices with the same tokens) draw from the same logits, each with its own spec.
            rows = logits[None].expand(len(draws), -1)  # [draws, V]
            drawn = self._sample_rows(rows, [(d.request_id, d.sample) for d in draws], failed)
            if not drawn.tokens:
                sampled.prompt_logprobs.pop(p.request_id, None)
                continue
            sampled.tokens.update(drawn.tokens)
            sampled.logprobs.update(drawn.logprobs)
            prefilled[p.request_id] = kv
            for d in draws:
                if d.request_id not in drawn.tokens:
                    continue
                if d.join:
                    cache.insert(d.request_id, kv)  # copies the KV into the row
                else:
                    pooled[d.request_id] = kv  # read only until it joins (then copied into its row)
        return sampled, pooled

    def _packed_prefills(self, prefills: tuple[Prefill, ...]) -> dict[str, tuple[RowKV, torch.Tensor]]:
        """The KV and last logits of the iteration's whole prompts that fit one chunk (no cached prefix, no prompt
        logprobs), computed in one packed forward where this runner packs and there are two or more; the rest
        (and all of them, should the packed forward fail) prefill one by one."""
        group = [p for p in prefills if p.until is None and p.prefix is None and p.prompt_logprobs is None
                 and len(p.token_ids) <= self.prefill_chunk]
        if self.captured is not None and group:
            return self._captured_prefills(group)
        if not self.packs or len(group) < 2:
            return {}
        try:
            results = self.prefill_packed([list(p.token_ids) for p in group])
        except Exception:
            log.exception("packed prefill of %d prompts failed; each prefills alone", len(group))
            return {}
        return {p.request_id: r for p, r in zip(group, results, strict=True)}

    def _captured_prefills(self, group: list[Prefill]) -> dict[str, tuple[RowKV, torch.Tensor]]:
        """`group`'s prompts through the captured prefill, as many per forward as it takes; a forward that fails
        leaves its prompts to the eager prefill."""
        assert self.captured is not None
        out: dict[str, tuple[RowKV, torch.Tensor]] = {}
        per = self.captured.max_prompts
        for i in range(0, len(group), per):
            part = group[i:i + per]
            t0 = time.perf_counter()
            try:
                results = self.captured.prefill([list(p.token_ids) for p in part])
            except Exception:
                log.exception("captured prefill of %d prompt(s) failed; each prefills alone", len(part))
                continue
            finally:
                self.forward_s += time.perf_counter() - t0
            out.update((p.request_id, r) for p, r in zip(part, results, strict=True))
        return out

    def _batch(self, rows: tuple[BatchRow, ...], prefill_tokens: dict[str, int], cache: BatchKVCache,
               failed: dict[str, str]) -> tuple[Sampled, BatchShape | None]:
        """The batch forward over every row of the cache, then one token per sampled row."""
        by_id = {r.request_id: r for r in rows if r.request_id not in failed}
        assert sorted(by_id) == sorted(cache.ids), "the plan's batch rows must be the cache's rows"
        if not by_id:
            return Sampled(), None
        ordered = [by_id[rid] for rid in cache.ids]
        feeds = [r.feed if r.feed is not None else (prefill_tokens[r.request_id],) for r in ordered]
        # Only pure decode steps are timed for the tuner: neighbouring ones have nearly the same shape.
        decode = all(len(f) == 1 for f in feeds)
        tuner = self.tuner if decode else None
        captured = decode and self.captured is not None and self.captured.takes(cache.rows, 1)
        try:
            with self.threads.forward(tuner.before() if tuner is not None else self.threads.most, pooled=captured):
                cpu0, t0 = time.process_time(), time.perf_counter()
                logits = self.batch_forward(cache, *batch_inputs(feeds, cache.real))
                if tuner is not None:
                    tuner.after(time.perf_counter() - t0, time.process_time() - cpu0)
        except Exception as e:
            log.exception("batch forward failed")
            failed.update((rid, f"batch forward failed: {e}") for rid in cache.ids)
            return Sampled(), None
        live = [r for r, row in enumerate(ordered) if row.sample is not None]
        if len(live) < len(ordered):  # run-to-completion rows that are done are computed, not sampled
            logits = logits.index_select(0, torch.tensor(live, device=logits.device))
        # A baton join's draw follows the token its own prefill drew in this iteration (its feed): the
        # penalties count that token too.
        specs = [(row.request_id, s if row.feed is not None else s.after(feed[0]))
                 for row, feed in zip(ordered, feeds, strict=True) if (s := row.sample)]
        sampled = self._sample_rows(logits, specs, failed)
        # Vector shaping's padding; the aligned window's extra masked columns are a kernel detail, not counted.
        attended = cache.rows * cache.length
        shape = BatchShape(len(ordered), max(len(f) for f in feeds), attended, attended - sum(cache.real))
        return sampled, shape

    def _in_batch_prompt_logprobs(self, rows: tuple[BatchRow, ...], sampled: dict[str, int],
                                  failed: dict[str, str]) -> dict[str, list[TokenLogprobs | None]]:
        """static/orca: the prompt logprobs of a prompt that joined inside the batch forward and asked for them,
        from a forward of that prompt alone (every position; its KV is dropped). The batch forward keeps only
        each row's last position, so no other row pays for them or sees its logits computed differently."""
        out: dict[str, list[TokenLogprobs | None]] = {}
        for row in rows:
            top = row.sample.prompt_logprobs if row.sample is not None else None
            if top is None or row.request_id not in sampled:
                continue
            assert row.feed is not None, "the first draw of a batch row that computes its prompt"
            try:
                with self.threads.forward(self.threads.most):  # as the prompt's own prefill would run
                    _, logits = self.prefill(list(row.feed), every_position=True)
                out[row.request_id] = prompt_logprobs(logits, row.feed, top)
            except Exception as e:
                log.exception("prompt logprobs of %s failed", row.request_id)
                failed[row.request_id] = f"prompt logprobs failed: {e}"
        return out

    @staticmethod
    def _sample_rows(logits: torch.Tensor, rows: list[tuple[str, SampleSpec]], failed: dict[str, str]
                     ) -> Sampled:
        """The one sampling entry point: a token per row of `logits` [rows, V] for (request id, draw) `rows`,
        drawn after each row's logit adjustments (penalties, bias, min_tokens: `adjust_logits`) and its
        grammar's mask (`mask_disallowed`), and its logprobs for the rows that asked, from the raw logits
        (vLLM's default; batched: the other rows cost nothing). Each row with a grammar advances it with its
        token. A row whose logits hold NaN (a model or device fault) fails alone; the others are sampled."""
        nan = nan_rows(logits)  # [rows]
        if bool(nan.any()):
            for r in nan.nonzero().flatten().tolist():
                failed[rows[r][0]] = "the model produced NaN logits for this request"
            keep = (~nan).nonzero().flatten()
            logits, rows = logits.index_select(0, keep), [rows[r] for r in keep.tolist()]
        if not rows:
            return Sampled()
        specs = [s for _, s in rows]
        adjusted = adjust_logits(logits, specs)
        adjusted = mask_disallowed(adjusted, specs, own=adjusted is not logits)
        tokens = sample(adjusted, [s.params for s in specs], [s.seed for s in specs], [s.index for s in specs])
        ids = [rid for rid, _ in rows]
        for rid, spec, token in zip(ids, specs, tokens, strict=True):
            refused = spec.grammar.advance(token) if spec.grammar is not None else None
            if refused is not None:  # only a masked-out draw can get here: a fault, not the client's
                failed[rid] = f"the sampled token {token} breaks the request's grammar: {refused}"
        want = [r for r, s in enumerate(specs) if s.top_logprobs is not None]
        logprobs: dict[str, TokenLogprobs] = {}
        if want:
            picked = logits.index_select(0, torch.tensor(want, device=logits.device))  # [len(want), V]
            top = [specs[r].top_logprobs or 0 for r in want]
            found = token_logprobs(picked, [tokens[r] for r in want], top)
            logprobs = dict(zip([ids[r] for r in want], found, strict=True))
        return Sampled({rid: t for rid, t in zip(ids, tokens, strict=True) if rid not in failed}, logprobs)

    @torch.no_grad()
    def prefill(self, token_ids: list[int], prefix: RowKV | None = None, every_position: bool = False
                ) -> tuple[RowKV, torch.Tensor]:
        """Run one prompt alone, on top of the KV of its first `prefix.length` tokens when given (the prefix
        cache's; only the rest is computed). Returns its KV [layers, H, p, D] (all of `token_ids`, as a full
        prefill) and the last position's logits [V] (with `every_position`: every computed position's [p, V],
        for prompt logprobs). Computed in chunks ending at multiples of `prefill_chunk` (`prefill_chunks`), so
        a prefill on a cached prefix gives exactly the bits of a full one."""
        t0 = time.perf_counter()
        kv = DynamicCache(config=self.model.config)
        start = 0
        if prefix is not None:  # the cached prefix's KV, then only the rest is computed
            start = prefix.length
            assert 0 < start < len(token_ids) and start % self.prefill_chunk == 0, (start, len(token_ids))
            for layer in range(self.shape.num_layers):
                kv.update(prefix.keys[layer][None].to(self.device), prefix.values[layer][None].to(self.device), layer)
        parts: list[torch.Tensor] = []
        for lo, hi in prefill_chunks(start, len(token_ids), self.prefill_chunk):
            positions, mask = prefix_inputs(lo, hi)
            keep = 0 if every_position else last_position(hi - lo, self.device)  # transformers: 0 keeps every position
            with last_position_alone(self.model) if every_position else contextlib.nullcontext(), self._prompts():
                out = self.model(input_ids=torch.tensor([token_ids[lo:hi]], dtype=torch.long, device=self.device),
                                 position_ids=positions.to(self.device), attention_mask=mask.to(self.device),
                                 past_key_values=kv, use_cache=True, logits_to_keep=keep)
            parts.append(out.logits[0] if every_position else out.logits[0, -1:])
        logits = torch.cat(parts).float() if every_position else parts[-1][0].float()
        self.forward_s += time.perf_counter() - t0
        return row_kv(kv), logits

    @torch.no_grad()
    def prefill_packed(self, prompts: list[list[int]]) -> list[tuple[RowKV, torch.Tensor]]:
        """Several prompts, each within one prefill chunk and computed from scratch, in one forward: end to end,
        positions restarting at each, attention per prompt (engine/attention.py). Returns each one's KV and last
        logits as `prefill` would, bit for bit (the linears are row-invariant: only where `packs`)."""
        assert self.packs and self.attention is not None
        assert all(0 < len(t) <= self.prefill_chunk for t in prompts), "one chunk per packed prompt"
        t0 = time.perf_counter()
        lengths = [len(t) for t in prompts]
        ends = list(itertools.accumulate(lengths))
        kv = DynamicCache(config=self.model.config)
        with self._prompts(), self.attention.packed(lengths):
            out = self.model(input_ids=torch.tensor([[t for p in prompts for t in p]], device=self.device),
                             position_ids=torch.cat([torch.arange(n) for n in lengths])[None].to(self.device),
                             past_key_values=kv, use_cache=True,
                             logits_to_keep=torch.tensor([e - 1 for e in ends], device=self.device))
        logits = out.logits[0].float()  # [prompts, V]
        layers: list[Any] = list(kv.layers)
        results = []
        for i, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            row = RowKV(torch.stack([layer.keys[0, :, lo:hi] for layer in layers]),
                        torch.stack([layer.values[0, :, lo:hi] for layer in layers]))
            results.append((row, logits[i]))
        self.forward_s += time.perf_counter() - t0
        return results

    @contextlib.contextmanager
    def _prompt_threads(self) -> Iterator[None]:
        """Prompts run at the thread count the tuner chose for decode steps (a core taken by another process slows
        them the same way), where their bits do not depend on it: where `packs` (every prompt linear through the
        AVX-512 kernel, one chain per element; SDPA splits its work by heads and query blocks), and then on the
        work-sharing pool where decode steps are. Elsewhere (F.linear's GEMMs) on the configured count of torch's
        threads. Their CPU share tells the tuner early that a core is taken (`ThreadTuner.prompts`)."""
        tuner = self.tuner
        threads = self.threads.most if tuner is None else tuner.current if self.packs else tuner.most
        t0, cpu0 = time.perf_counter(), time.process_time()
        pooled = self.packs and self.threads.shared  # packs: every linear through the kernels
        with self.threads.forward(threads, pooled=pooled):
            yield
        # (not on an exception: a failed forward says nothing of the CPU; nor one on the pool, see ThreadTuner)
        if tuner is not None and not pooled:
            tuner.prompts(time.perf_counter() - t0, time.process_time() - cpu0, threads)

    def decode_threads(self) -> int:
        """The threads decode steps use now (the tuner's current choice, else the configured count)."""
        return self.tuner.current if self.tuner is not None else self.threads.most

    def _prompts(self) -> contextlib.AbstractContextManager[None]:
        """Prompts' linears through the row-invariant kernel, where there is one (bfloat16 on AMX, else where
        `lanes_prompt_kernel` gives one)."""
        if self.narrow is None or self._prompt_kernel is None:
            return contextlib.nullcontext()
        return self.narrow.active(self._prompt_kernel)

    @torch.no_grad()
    def batch_forward(self, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor,
                      real: torch.Tensor) -> torch.Tensor:
        """One forward of the whole batch.

        input_ids, positions, real: [rows, T] (T = 1 for a pure decode step; wider when prompts join inside
        the batch). The cache gains T columns. Returns the last position's logits [rows, V].
        """
        t0 = time.perf_counter()
        t = input_ids.shape[1]
        cache.set_step_mask(real)
        window = cache.mask_view(extra=t, aligned=True)  # [rows, attention_width(L + t)]
        if self.captured is not None and self.captured.takes(cache.rows, t):
            logits = self.captured.decode(cache, input_ids.to(self.device), positions.to(self.device), window)
            cache.advance(t)
            self.forward_s += time.perf_counter() - t0
            return logits[:, -1].float()
        mask = build_step_mask(window, window.shape[1] - t)
        narrow = self.narrow.active(self._row_kernel) if self.narrow and self._row_kernel else contextlib.nullcontext()
        attention = self.attention.decode(self.attention_kernel) if self.attention else contextlib.nullcontext()
        with narrow, attention:
            out = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=positions.to(self.device),
                attention_mask=mask,
                past_key_values=ShapedCacheAdapter(cache),
                use_cache=True,
                logits_to_keep=last_position(t, self.device),
            )
        cache.advance(t)
        logits = out.logits[:, -1].float()
        self.forward_s += time.perf_counter() - t0
        return logits


def layer_linear_weights(model: Any) -> list[torch.Tensor]:
    """The weights of the model's linear layers but the output embedding (which prompts reach only with prompt
    logprobs or more than 32 at once: its tile copy is left to first use)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m.weight for m in model.modules() if type(m) is torch.nn.Linear and m is not output]


def pack_layer_weights(model: Any) -> int:
    """Pack the layers' linear weights (each must `tiles_fit`) for the AMX kernel's many-rows path now, at load,
    rather than on the first prompt (`narrow_linear.packed_weight`). Returns the bytes the packed copies take."""
    return sum(packed_weight(w).nbytes for w in layer_linear_weights(model))


def last_position(width: int, device: torch.device | None = None) -> int | torch.Tensor:
    """`logits_to_keep` for the last of `width` positions. Past one position, an index tensor rather than 1:
    transformers then gathers the last position into a tensor of its own, where 1 slices a view of it whose
    [batch, 1, hidden] strides send a bfloat16 output embedding on CPU through a batched product that copies
    the whole [hidden, vocab] weight (~0.2-0.3 s per prefill for the default model, against ~10 ms). The
    logits are the same bits either way."""
    return 1 if width == 1 else torch.tensor([width - 1], device=device)


def row_kv(kv: DynamicCache) -> RowKV:
    """The one row of a batch-1 `DynamicCache` as a `RowKV` [layers, H, p, D]."""
    layers: list[Any] = list(kv.layers)
    return RowKV(torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers]))


def prefill_chunks(start: int, total: int, chunk: int) -> list[tuple[int, int]]:
    """The [lo, hi) token ranges a prefill computes from `start` to `total`: ends at multiples of `chunk`
    (absolute positions), so a prompt is cut at the same places whether its first tokens came from the prefix
    cache or were computed: a hit runs the very forwards a miss runs after it, bit for bit."""
    cuts = [*range((start // chunk + 1) * chunk, total, chunk), total]
    return list(zip([start, *cuts[:-1]], cuts, strict=True))


def prefix_inputs(cached: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [1, total - cached] and 2-D mask [1, total] of a prefill chunk on top of `cached` tokens of
    KV: the new tokens continue the positions after the cached ones and see every cached column (the model adds
    causality among the new ones)."""
    return torch.arange(cached, total)[None], torch.ones(1, total, dtype=torch.long)


def batch_inputs(feeds: list[tuple[int, ...]], cached: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, positions and real-token flags [rows, T] of the batch forward, T the longest feed.

    Feeds are left-padded to T; a row's positions continue from the tokens it has cached (`cached[r]`), so a
    decode row computes position `cached[r]` and a prompt joining an empty row positions 0..k-1.
    """
    n, t = len(feeds), max(len(f) for f in feeds)
    if t == 1:  # the common, pure decode step
        return (torch.tensor(feeds), torch.tensor(cached)[:, None], torch.ones(n, 1, dtype=torch.bool))
    inp = torch.zeros(n, t, dtype=torch.long)
    pos = torch.zeros(n, t, dtype=torch.long)
    real = torch.zeros(n, t, dtype=torch.bool)
    for r, feed in enumerate(feeds):
        k = len(feed)
        inp[r, t - k:] = torch.tensor(feed)
        pos[r, t - k:] = cached[r] + torch.arange(k)
        real[r, t - k:] = True
    return inp, pos, real
