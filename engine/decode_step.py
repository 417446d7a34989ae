"""The decode step of a Llama-family model captured as one compiled operator (engine/kernels/decode_step.cpp).

A pure decode step of the batch forward (one new token per row) runs ~2,000 small torch operations through
transformers' eager forward; on the default model on CPU the Python around them (module calls, argument parsing, our
cache adapter) costs more than the arithmetic (benchmarks/NOTES.md, session 9). `CapturedDecode` runs the same
operations, in the same order and on the same shapes, from C++: the embedding, rotary tables, per layer RMSNorm, the
q/k/v projections through the engine's row kernel, rotary, the cache columns written in place, the engine's
attention kernel over the aligned window, o_proj and the residual, RMSNorm, SiLU-gated MLP and the residual, then the
final norm and the output embedding. Its logits and cache columns are the eager path's bit for bit
(tests/engine/test_decode_step.py compares them with `torch.equal`), so every exactness and batch-invariance guarantee
carries over. The model's modules and weights are read, never changed; the operator holds no GIL while it runs.

It applies where the eager forward would compute exactly these operations: transformers' own Llama classes (no
biases, default RoPE, SiLU), float32 or bfloat16, the engine's attention kernel, and a row kernel for the linears that
is plain F.linear or one the engine's narrow-linear switch would call at this row count
(`narrow_linear.row_kernel_op`). Anything else (prompts joining inside the batch forward, other architectures,
more rows than the row kernel takes) runs the eager forward as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine import cpu_kernel
from engine.kv_cache import BatchKVCache

log = logging.getLogger(__name__)

_PER_LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class CapturedDecode:
    """The model's decode step as one operator, with the row kernel its linears take up to `max_rows` rows."""

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

    @staticmethod
    def build(model: Any, linear_kernel: str, max_rows: int) -> CapturedDecode | str:
        """The captured step for `model`, or why it does not apply (a sentence)."""
        reason = why_not(model)
        if reason is not None:
            return reason
        if cpu_kernel.decode_step() is None:
            return f"the operator did not build: {cpu_kernel.why_not_decode_step()}"
        config, inner = model.config, model.model
        layers: list[torch.Tensor] = []
        for layer in inner.layers:
            for name in _PER_LAYER:
                layers.append(layer.get_submodule(name).weight.detach())
        if linear_kernel and not all(w.is_contiguous() for w in [*layers, model.lm_head.weight]):
            return "a linear weight is not contiguous (the row kernel would not take it)"
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return CapturedDecode(
            layer_weights=tuple(layers), embed=inner.embed_tokens.weight.detach(),
            inv_freq=inner.rotary_emb.inv_freq, final_norm=inner.norm.weight.detach(),
            lm_head=model.lm_head.weight.detach(), eps=float(inner.norm.variance_epsilon),
            scale=float(inner.layers[0].self_attn.scaling), rope_scaling=float(inner.rotary_emb.attention_scaling),
            heads=heads, kv_heads=config.num_key_value_heads, head_dim=head_dim, linear_kernel=linear_kernel,
            max_rows=max_rows,
        )

    def takes(self, rows: int, new_columns: int) -> bool:
        """Whether a batch forward of `rows` rows adding `new_columns` columns runs here."""
        return new_columns == 1 and 0 < rows <= self.max_rows

    @torch.no_grad()
    def __call__(self, cache: BatchKVCache, input_ids: torch.Tensor, positions: torch.Tensor, window: torch.Tensor
                 ) -> torch.Tensor:
        """One decode step over every row of `cache`: input_ids, positions [rows, 1]; window [rows, W], the aligned
        window's mask with the new column. Writes the new column at `cache.end` (the caller advances the cache) and
        returns the logits [rows, 1, vocab] in the model's dtype."""
        return torch.ops.baton_step.llama_decode(
            input_ids, positions, window, cache.keys, cache.values, cache.attention_start(1), cache.end, self.embed,
            self.inv_freq, list(self.layer_weights), self.final_norm, self.lm_head, self.eps, self.scale,
            self.rope_scaling, self.heads, self.kv_heads, self.head_dim, self.linear_kernel)


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
