"""The engine's attention function: the decode batch through a compiled kernel, packed prompts one by one.

Registered with transformers' `AttentionInterface` under the name `baton` (with SDPA's mask function), and the
model's config pointed at it where the model used SDPA; no model code is edited. Outside an engine's forward it is
exactly transformers' SDPA forward, so `generate` and anything else running the model is unchanged. Two modes,
set per thread by the model runner around its own forwards:

* **Decode batch** (`with attention.decode():`): SDPA's CPU flash kernel reads every column of the batch's window,
  the left padding of shorter rows included, and for one query per row spends ~10-22 ms of a 16-row decode step of
  the default model (benchmarks/NOTES.md). `engine/kernels/decode_attention.cpp` computes each query over exactly
  the columns its mask lets it see, in column order, once per key/value head for the query heads that share it. A
  row's result depends on nothing but its own columns, so its bits are the same alone or in any batch, aligned
  window or not. Anything the kernel does not take (a float mask, dropout, sliding windows, soft-capping, another
  dtype, a head_dim not a multiple of 16) goes to SDPA.
* **Packed prompts** (`with attention.packed(lengths):`): several prompts concatenated into one forward, each
  attending causally to its own tokens only, through the very SDPA call it would get alone (per prompt, no mask,
  causal). With row-invariant linears (engine/narrow_linear.py, `amx_linear`) a packed prompt's KV and logits are
  then bit-identical to its solo prefill's.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from engine import cpu_kernel

NAME = "baton"
_ATTR = "_baton_attention"  # where a model keeps its switch, so engines sharing it share one
_DTYPES = (torch.float32, torch.bfloat16)  # the kernel's
_FOREIGN = ("sliding_window", "softcap", "s_aux", "position_bias")  # what neither mode computes

Kernel = Callable[..., torch.Tensor]


class _State(threading.local):
    kernel: Kernel | None = None  # set while an engine's batch forward runs on this thread
    segments: tuple[tuple[int, int], ...] | None = None  # set while a packed prefill runs on this thread


_state = _State()


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    foreign = any(kwargs.get(k) is not None for k in _FOREIGN)
    if _state.segments is not None and not foreign:
        return _packed(module, query, key, value, _state.segments, dropout, scaling, **kwargs), None
    kernel = _state.kernel
    if (kernel is None or foreign or attention_mask is None or attention_mask.dtype is not torch.bool
            or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or dropout != 0.0 or query.shape[-1] % 16
            or query.dtype not in _DTYPES or key.dtype is not query.dtype or value.dtype is not query.dtype):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask[:, 0].expand(query.shape[0], query.shape[2], key.shape[2])  # [rows, T, W]
    return kernel(query, key, value, mask, float(scale)), None  # [rows, T, heads, head_dim]


def _packed(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            segments: tuple[tuple[int, int], ...], dropout: float, scaling: float | None, **kwargs: Any
            ) -> torch.Tensor:
    """query/key/value [1, heads, N, head_dim] of prompts packed end to end; each segment [s, e) attends causally to
    itself through the SDPA call of a prompt alone (no mask, causal). Returns [1, N, heads, head_dim]."""
    assert query.shape[0] == 1 and key.shape[2] == query.shape[2] == segments[-1][1], "a packed prefill from scratch"
    parts = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                    dropout=dropout, scaling=scaling, **kwargs)[0] for s, e in segments]
    return torch.cat(parts, dim=1)


def _register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    assert NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@contextlib.contextmanager
def as_sdpa(model: torch.nn.Module) -> Iterator[None]:
    """Within this block the model's config names SDPA again, for code that dispatches on the name itself and
    knows no other (transformers' continuous batching refuses unknown implementations). Engines on this model
    must not step meanwhile: their kernels are not called under that name."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != NAME:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = NAME


class EngineAttention:
    """The switch shared by every engine on one model: `install` once per model; `decode()` around a batch
    forward, `packed(lengths)` around a packed prefill."""

    def __init__(self, kernel: Kernel | None) -> None:
        self.kernel = kernel  # the decode batch's kernel; None where it does not build here (SDPA then)

    @staticmethod
    def install(model: torch.nn.Module) -> EngineAttention | None:
        """The model's switch, or None where the model does not use SDPA (its attention is left as it is)."""
        existing = getattr(model, _ATTR, None)
        if isinstance(existing, EngineAttention):
            return existing
        config = getattr(model, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
            return None
        _register()
        config._attn_implementation = NAME
        switch = EngineAttention(cpu_kernel.decode_attention())
        setattr(model, _ATTR, switch)
        return switch

    @contextlib.contextmanager
    def decode(self, kernel: bool = True) -> Iterator[None]:
        """Within this block (this thread only), the batch forward's attention runs through the kernel (where it
        built here and `kernel` is set; else SDPA)."""
        _state.kernel = self.kernel if kernel else None
        try:
            yield
        finally:
            _state.kernel = None

    @staticmethod
    @contextlib.contextmanager
    def packed(lengths: Sequence[int]) -> Iterator[None]:
        """Within this block (this thread only), the forward's tokens are prompts of `lengths`, end to end."""
        ends = list(itertools.accumulate(lengths))
        _state.segments = tuple(zip([0, *ends[:-1]], ends, strict=True))
        try:
            yield
        finally:
            _state.segments = None
