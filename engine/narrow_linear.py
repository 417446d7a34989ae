"""Linear layers on a few rows, in the orientation MKL runs fast on CPU.

`F.linear(x, W)` computes `x @ W.T`. With a handful of rows (a decode batch) and weights that stream from
DRAM, MKL's kernel for that orientation is slow on this class of CPU, while `(W @ x.T).T` — the same
product, the same weight, no copy of it — runs at the speed of one row. Measured with 2 threads, the 30
layers' linears of SmolLM2-135M with weights streaming from DRAM: 58 ms vs 35 ms at 2 rows, 65 vs 29 at 4,
62 vs 43 at 16; the 49152 x 576 LM head: 22-33 ms vs 7-13 ms at 2-8 rows (benchmarks/NOTES.md,
`python -m benchmarks.step_profile`).

`NarrowLinear.install(model)` gives each of the model's `nn.Linear` modules a forward that, while the
engine's decode forward runs (`with narrow.active():`), computes `F.linear` on 2..`max_rows` rows as
`(W @ x.T).T + b`, and otherwise is exactly `F.linear`. The model's code, modules and weights stay as they
are; only the kernel of its linear layers changes, and only inside the engine's decode step. One row keeps
`F.linear` (a matrix-vector product either way); wide inputs (prompts) keep it too, where MKL's usual kernel
is faster. Results differ from `F.linear`'s only in summation order, as `F.linear`'s own do between 1 and
16 rows; the exactness tests compare the engine against solo `generate` with it on.

(A torch function mode would do the same without touching the modules, but it puts every torch call of the
forward, ~3000 per step, through Python: +17 ms per step here, most of the gain.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

_LINEAR = torch.nn.functional.linear
_ATTR = "_baton_narrow_linear"  # where a model keeps its switch, so engines sharing it share one
MAX_ROWS = 16  # measured from 2 to 16 rows (benchmarks/step_profile.py); wider inputs keep F.linear


class NarrowLinear:
    """The switch shared by every engine on one model: `install` once per model, `active()` per forward."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._active = threading.local()

    @staticmethod
    def install(model: torch.nn.Module, max_rows: int = MAX_ROWS) -> NarrowLinear:
        """The model's switch, installing the forwards on its first call. Modules whose forward is already
        replaced per instance (e.g. accelerate's offloading hooks) are left alone."""
        existing = getattr(model, _ATTR, None)
        if isinstance(existing, NarrowLinear):
            return existing
        narrow = NarrowLinear(max_rows)
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                module.forward = functools.partial(narrow._forward, module)  # type: ignore[method-assign]
        setattr(model, _ATTR, narrow)
        return narrow

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this block (this thread only), the model's linears use the narrow kernel."""
        self._active.on = True
        try:
            yield
        finally:
            self._active.on = False

    def _forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if getattr(self._active, "on", False):
            out = narrow_linear(x, module.weight, module.bias, max_rows=self.max_rows)
            if out is not None:
                return out
        return _LINEAR(x, module.weight, module.bias)


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  max_rows: int = MAX_ROWS) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` as `(weight @ x.T).T` for 2..max_rows rows on CPU; None where it does not
    apply (the caller then runs `F.linear`)."""
    if x.device.type != "cpu" or weight.dim() != 2 or x.dim() < 2 or x.dtype != weight.dtype:
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= max_rows:
        return None
    flat = x.reshape(rows, x.shape[-1])
    out = torch.mm(weight, flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])
