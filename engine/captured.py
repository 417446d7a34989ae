"""A Llama-family model's two common forwards, each as one compiled operator (engine/kernels/captured_llama.cpp).

A pure decode step of the batch forward (one new token per row) runs ~2,000 small torch operations through
transformers' eager forward; on the default model on CPU the Python around them (module calls, argument parsing, our
cache adapter) costs more than the arithmetic (benchmarks/NOTES.md, session 9), and a short prompt's prefill pays the
same. `CapturedLlama` runs the same operations, in the same order and on the same shapes, from C++:
* `decode`: the embedding, rotary tables, per layer RMSNorm, the q/k/v projections through the engine's row kernel,
  rotary, the cache columns written in place, the engine's attention kernel over the aligned window, o_proj and the
  residual, RMSNorm, SiLU-gated MLP and the residual, then the final norm and the output embedding. With a few rows,
  ATen's per-call cost is most of what the norms, rotary, residual adds and cache writes cost (~40 calls a layer),
  so these run as fused loops that round after every operation exactly as ATen does, RMSNorm's mean summed in the
  order of ATen's sum kernel (`fused_lanes`, checked against the ATen calls on the real weights before use);
* `prefill`: prompts from scratch, one, or several end to end where the prompts' linears are row-invariant (bfloat16
  on AMX, `packs`), each attending causally to its own tokens through the SDPA call transformers makes for it alone.
Logits, cache columns and KV are the eager path's bit for bit (tests/engine/test_captured.py compares them with
`torch.equal`), so every exactness and batch-invariance guarantee carries over. The model's modules and weights are
read, never changed; the operators hold no GIL while they run.

It applies where the eager forward would compute exactly these operations: transformers' own Llama classes (no
biases, default RoPE, SiLU), float32 or bfloat16, the engine's attention kernel, and a row kernel for the linears that
is plain F.linear or one the engine's narrow-linear switch would call at this row count
(`narrow_linear.row_kernel_op`). Anything else (prompts joining inside the batch forward, prompts on a cached prefix
or in chunks, other architectures, more rows than the row kernel takes) runs the eager forward as before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine import cpu_kernel
from engine.kv_cache import BatchKVCache, RowKV
from engine.narrow_linear import NO_ROW_LIMIT, lanes_weight

log = logging.getLogger(__name__)

_PER_LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class CapturedLlama:
    """The model's decode step and prompt prefill as operators: the decode step's linears through `linear_kernel` up
    to `max_rows` rows; prompts' linears as `prompt_kernel` says (see `PromptKernel`)."""

    layer_weights: tuple[torch.Tensor, ...]  # 9 per layer, in _PER_LAYER's order
    embed: torch.Tensor
    inv_freq: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    scale: float
    rope_scaling: float
    heads: int
    kv_heads: int
    head_dim: int
    linear_kernel: str  # a torch operator "namespace::name" taking (x [rows, in], w), or "" for F.linear
    max_rows: int
    prompt_kernel: PromptKernel
    # The decode step's norms, rotary, residuals and cache writes as fused loops, RMSNorm summing in the order of
    # ATen's sum kernel with vectors of this many floats; 0: as ATen calls (see `fused_lanes`)
    fused_lanes: int = 0

    @staticmethod
    def build(model: Any, linear_kernel: str, max_rows: int, prompt_kernel: PromptKernel | None = None,
              decode_lanes: bool = False) -> CapturedLlama | str:
        """The captured step for `model`, or why it does not apply (a sentence); its decode step's small operations
        as fused loops where they reproduce ATen's calls here (`fused_lanes`). `decode_lanes`: the decode step's
        linears take the weights' `narrow_linear.lanes_weight` copies, as `narrow_linear.lanes_decode_kernel` does."""
        reason = why_not(model)
        if reason is not None:
            return reason
        if cpu_kernel.captured_llama() is None:
            return f"the operator did not build: {cpu_kernel.why_not_captured()}"
        config, inner = model.config, model.model
        def weight(module: Any, linear: bool = True) -> torch.Tensor:
            return lanes_weight(module.weight) if decode_lanes and linear else module.weight.detach()

        layers = [weight(layer.get_submodule(name), not name.endswith("layernorm"))
                  for layer in inner.layers for name in _PER_LAYER]
        lm_head = weight(model.lm_head)
        if linear_kernel and not all(w.is_contiguous() for w in [*layers, lm_head]):
            return "a linear weight is not contiguous (the row kernel would not take it)"
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        built = CapturedLlama(
            layer_weights=tuple(layers), embed=inner.embed_tokens.weight.detach(),
            inv_freq=inner.rotary_emb.inv_freq, final_norm=inner.norm.weight.detach(),
            lm_head=lm_head, eps=float(inner.norm.variance_epsilon),
            scale=float(inner.layers[0].self_attn.scaling), rope_scaling=float(inner.rotary_emb.attention_scaling),
            heads=heads, kv_heads=config.num_key_value_heads, head_dim=head_dim, linear_kernel=linear_kernel,
            max_rows=max_rows, prompt_kernel=prompt_kernel or PromptKernel(),
        )
        return dataclasses.replace(built, fused_lanes=fused_lanes(built))

    def takes(self, rows: int, new_columns: int) -> bool:
        """Whether a batch forward of `rows` rows adding `new_columns` columns runs here."""
        return new_columns == 1 and 0 < rows <= self.max_rows

    @torch.no_grad()
    def decode(self, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor
               ) -> torch.Tensor:
        """One decode step over every row of `cache`: input_ids, positions [rows, 1]; window [rows, W], the aligned
        window's mask with the new column. Writes the new column at `cache.end` (the caller advances the cache) and
        returns the logits [rows, 1, vocab] in the model's dtype."""
        return torch.ops.baton_captured.llama_decode(
            input_ids, positions, window, cache.keys, cache.values, cache.attention_start(1), cache.end, self.embed,
            self.inv_freq, list(self.layer_weights), self.final_norm, self.lm_head, self.eps, self.scale,
            self.rope_scaling, self.heads, self.kv_heads, self.head_dim, self.linear_kernel, self.fused_lanes)

    @property
    def packs(self) -> bool:
        """Whether several prompts may share one `prefill` (their linears are row-invariant)."""
        return self.prompt_kernel.row_invariant

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> list[tuple[RowKV, torch.Tensor]]:
        """Prompts computed from scratch in one forward (one prompt unless `packs`; at most `max_prompts`): each
        one's KV [layers, kv_heads, p, head_dim] and last logits [vocab] (float32), as `ModelRunner.prefill` /
        `prefill_packed` compute them, bit for bit."""
        assert prompts and (len(prompts) == 1 or self.packs) and len(prompts) <= self.max_prompts
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([[t for p in prompts for t in p]], device=self.embed.device)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(self.embed.device)
        k = self.prompt_kernel
        keys, values, logits = torch.ops.baton_captured.llama_prefill(
            ids, positions, lengths, self.embed, self.inv_freq, list(self.layer_weights), list(k.packed),
            self.final_norm, self.lm_head, self.eps, self.scale, self.rope_scaling, self.heads, self.kv_heads,
            self.head_dim, k.few_rows, k.few_kernel, k.packed_kernel, k.lm_head)
        out, lo = [], 0
        for i, n in enumerate(lengths):
            out.append((RowKV(keys[:, :, lo:lo + n].contiguous(), values[:, :, lo:lo + n].contiguous()),
                        logits[i].float()))
            lo += n
        return out

    @property
    def max_prompts(self) -> int:
        """The most prompts one `prefill` takes: their last positions go through the output embedding's few-rows
        path (any number through its packed copy)."""
        k = self.prompt_kernel
        return 1 if not self.packs else NO_ROW_LIMIT if k.lm_head is not None else k.few_rows


@dataclass(frozen=True)
class PromptKernel:
    """How the eager forward computes a prompt's linears, for `llama_prefill` to do the same: F.linear (the default:
    `few_rows` 0), or bfloat16 on AMX (`narrow_linear.amx_linear`): up to `few_rows` rows through `few_kernel` with
    the weight as it is, beyond through `packed_kernel` with the weight's packed copy (`packed`: the 7 linear
    weights' copies per layer, q k v o gate up down); or float32 through `few_kernel` for any row count
    (`few_rows` NO_ROW_LIMIT, nothing packed); or, through the AVX-512 kernel's lanes (bfloat16 without AMX, float32
    off Intel: `narrow_linear.lanes_prompt_kernel`), every row through `packed_kernel` with the weights'
    `narrow_linear.lanes_weight` copies (`few_rows` 0; `lm_head`: the output embedding's)."""

    few_rows: int = 0
    few_kernel: str = ""
    packed_kernel: str = ""
    packed: tuple[torch.Tensor, ...] = ()
    lm_head: torch.Tensor | None = None  # the output embedding as `packed_kernel` takes it, for any row count

    @property
    def row_invariant(self) -> bool:
        """Whether every prompt row goes through a row-invariant kernel: past `few_rows` through the packed copies, or
        `few_kernel` for any row count (the AVX-512 kernel's lanes, `narrow_linear.lanes_prompt_kernel`)."""
        if self.few_rows == 0:
            return bool(self.packed_kernel) and bool(self.packed) and self.lm_head is not None
        return bool(self.few_kernel) and (bool(self.packed) or self.few_rows >= NO_ROW_LIMIT)


@functools.cache
def sum_lanes() -> int:
    """The vector width (floats) with which the fused loops' emulated sum (`baton_captured::row_sum`) equals
    `torch.sum` of a contiguous float32 row here, on 64 random rows of 4,096 (a scalar tail aside, every part of the
    kernel's order: interleaved accumulators, the cascade, the lanes' final sum); 0 where none does. It is ATen's
    float sum kernel's width, not always the CPU's widest: 8 on an AVX-512 CPU with torch 2.13."""
    gen = torch.Generator().manual_seed(0)
    squares = (torch.randn(64, 4096, generator=gen) * torch.rand(64, 1, generator=gen) * 8).pow(2)
    return next((n for n in (16, 8, 4) if torch.equal(torch.ops.baton_captured.row_sum(squares, n),
                                                        squares.sum(-1))), 0)


def fused_lanes(step: CapturedLlama) -> int:
    """The lanes for `step`'s fused decode (`CapturedLlama.fused_lanes`), or 0 where it must not fuse.

    The fused loops round after every operation as ATen does; RMSNorm's sum alone depends on an order, that of ATen's
    float sum kernel (`sum_lanes`). Before it is used, the fused step is run against the step of ATen calls on the
    real weights (3 rows, random cache columns; every layer's two norms and the final one, the rotary of every head):
    logits and written cache columns must be equal bit for bit, else the step stays on ATen's calls and the log says
    why."""
    lanes = sum_lanes()
    if lanes == 0:
        log.warning("decode step: ATen's sum order is not one the fused loops know here; the step runs ATen's calls")
        return 0
    gen = torch.Generator().manual_seed(0)
    rows, columns, n_layers = 3, 6, len(step.layer_weights) // 9
    shape = (n_layers, rows, step.kv_heads, columns, step.head_dim)
    keys = torch.randn(shape, generator=gen).to(step.embed.dtype)
    values = torch.randn(shape, generator=gen).to(step.embed.dtype)
    ids = torch.randint(0, step.embed.shape[0], (rows, 1), generator=gen)
    positions = torch.tensor([[columns - 1], [3], [columns + 40]])
    window = torch.ones(rows, columns, dtype=torch.bool)
    window[1, :2] = False
    outputs = []
    for n in (0, lanes):
        k, v = keys.clone(), values.clone()
        logits = torch.ops.baton_captured.llama_decode(
            ids, positions, window, k, v, 0, columns - 1, step.embed, step.inv_freq, list(step.layer_weights),
            step.final_norm, step.lm_head, step.eps, step.scale, step.rope_scaling, step.heads, step.kv_heads,
            step.head_dim, step.linear_kernel, n)
        outputs.append((logits, k, v))
    if all(torch.equal(a, b) for a, b in zip(*outputs, strict=True)):
        return lanes
    log.warning("decode step: the fused loops do not reproduce ATen's calls bit for bit here; the step runs ATen's "
                "calls")
    return 0


def layer_linears(model: Any) -> list[torch.Tensor]:
    """The 7 linear weights of each layer in the order `PromptKernel.packed` holds their copies: q k v o gate up
    down."""
    names = [n for n in _PER_LAYER if not n.endswith("layernorm")]
    return [layer.get_submodule(n).weight for layer in model.model.layers for n in names]


def why_not(model: Any) -> str | None:
    """Why the captured step does not apply to `model` (None where it does): it must be transformers' own Llama, as
    loaded, with the engine's attention installed."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama import modeling_llama as llama

    config = getattr(model, "config", None)
    if type(model) is not llama.LlamaForCausalLM or config is None:
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    if getattr(config, "_attn_implementation", None) != "baton":
        return "the engine's attention is not installed on the model"
    dtype = model.lm_head.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or model.lm_head.weight.device.type != "cpu":
        return f"{dtype} on {model.lm_head.weight.device.type}: the step runs float32 or bfloat16 on CPU"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model's linears have biases"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"RoPE type {rope.get('rope_type')!r} (the step computes the default one)"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 16 or heads % kv_heads or heads // kv_heads > 64:
        return "the attention kernel does not take this head layout"
    inner = model.model
    if type(inner.norm) is not llama.LlamaRMSNorm or type(inner.rotary_emb) is not llama.LlamaRotaryEmbedding:
        return "the model's norm or rotary module is not transformers' Llama one"
    for layer in inner.layers:
        if (type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention
                or type(layer.mlp) is not llama.LlamaMLP or type(layer.mlp.act_fn) is not SiLUActivation
                or type(layer.input_layernorm) is not llama.LlamaRMSNorm
                or type(layer.post_attention_layernorm) is not llama.LlamaRMSNorm
                or layer.input_layernorm.variance_epsilon != inner.norm.variance_epsilon
                or layer.post_attention_layernorm.variance_epsilon != inner.norm.variance_epsilon):
            return "a layer is not transformers' Llama layer (SiLU MLP, RMSNorm with the model's epsilon)"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None) is not None:
            return "the model has forward hooks (the step would skip them)"
        if any(p.dtype is not dtype for p in module.parameters(recurse=False)):
            return "the model's weights do not share one dtype"
    return None
