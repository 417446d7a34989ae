"""Linear layers on a few rows (the decode batch) with a kernel that is fast for that shape on CPU.

`F.linear(x, W)` on 1-16 rows streams every weight once per call, so a decode step is bound by memory
bandwidth; MKL, which `F.linear` calls, reaches only ~11 GB/s there on the 2-core AMD EPYC this project
measures on (one thread for one row; slower still for 2-16 rows). Two kernels do better (benchmarks/NOTES.md,
`python -m benchmarks.step_profile`):

* `compiled` (engine/kernels/skinny_linear.cpp, built by engine/cpu_kernel.py): an AVX2/FMA kernel that splits
  the weight's rows over torch's threads, 1-16 rows, float32; ~20-24 GB/s. A row's result does not depend on
  the other rows of its batch (fixed summation order per element). On CPUs with AVX512-BF16 its sibling
  skinny_linear_avx512.cpp takes float32 (1-16 rows, 4 x 4 blocks of 16 lanes) and bfloat16: on CPUs with
  AMX 1-32 rows through AMX tiles, elsewhere any number of rows through vdpbf16ps lanes, each with a fixed order
  per element. (Without the AVX-512 kernel bfloat16 keeps F.linear, whose bfloat16 GEMM is row-invariant on
  some CPUs and not on others.) Where prompts run through that kernel's copies of the weights laid out for 16
  outputs per vector (`lanes_prompt_kernel`), the decode batch takes them too, any number of rows
  (`lanes_decode_kernel`).
* `transposed`: `(W @ x.T).T`, the same product in the orientation MKL runs fast for 2-16 rows; no build
  needed, the fallback where the compiled kernel cannot run (no AVX2, no compiler).

`NarrowLinear.install(model)` gives each of the model's `nn.Linear` modules a forward that, while an engine's
decode forward runs (`with narrow.active(kernel):`), uses that engine's kernel for inputs of at most
`max_rows` rows, and otherwise is exactly `F.linear`. The model's code, modules and weights stay as they are;
only the kernel of its linear layers changes, and only inside the engine's decode step. Wide inputs (prompts)
keep `F.linear`, where MKL's usual kernel is faster. Results differ from `F.linear`'s only in summation
order, as `F.linear`'s own do between 1 and 16 rows; the exactness tests compare the engine against solo
`generate` with each kernel.

(A torch function mode would do the same without touching the modules, but it puts every torch call of the
forward, ~3000 per step, through Python: +17 ms per step here, most of the gain.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from engine import cpu_kernel

_LINEAR = torch.nn.functional.linear
_PACKED = "_baton_amx_packed"  # a weight's packed copy (packed_weight)
_LANES = "_baton_lanes_packed"  # a weight's copy for 16 outputs per vector (lanes_weight)
_ATTR = "_baton_narrow_linear"  # where a model keeps its switch, so engines sharing it share one
MAX_ROWS = 16  # measured from 1 to 16 rows (benchmarks/step_profile.py); wider inputs keep F.linear
# bfloat16: up to 32 rows, the range where F.linear (which it replaces) was row-invariant, so that batch
# invariance holds over the same batch sizes as before (benchmarks/NOTES.md, bf16 batch invariance).
MAX_ROWS_BF16 = 32

KernelName = Literal["auto", "compiled", "transposed"]
# (x [..., in], weight [out, in], bias [out] | None) -> x @ weight.T + bias, or None where it does not apply
RowKernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]


def _rows(x: torch.Tensor, max_rows: int, min_rows: int) -> int | None:
    if x.device.type != "cpu" or x.dim() < 2 or x.shape[-1] == 0:
        return None
    rows = x.numel() // x.shape[-1]
    return rows if min_rows <= rows <= max_rows else None


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      max_rows: int = MAX_ROWS) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` as `(weight @ x.T).T` for 2..max_rows rows on CPU; None where it does not
    apply (the caller then runs `F.linear`)."""
    rows = _rows(x, max_rows, 2)
    if rows is None or weight.dim() != 2 or x.dtype != weight.dtype:
        return None
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def compiled_linear(kernel: cpu_kernel.Kernel, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, *, max_rows: int = MAX_ROWS,
                    dtype: torch.dtype = torch.float32, lanes: bool = False) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` through the compiled kernel for 1..max_rows rows of `dtype` (the kernel's)
    on CPU; None where it does not apply. `lanes`: the AVX-512 kernel with the weight's `lanes_weight` copy."""
    if x.dtype is not dtype or weight.dtype is not dtype:
        return None
    rows = _rows(x, max_rows, 1)
    if rows is None or weight.dim() != 2 or not weight.is_contiguous():
        return None
    out = kernel(x.reshape(rows, x.shape[-1]).contiguous(), lanes_weight(weight) if lanes else weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def resolve_kernel(name: KernelName, max_rows: int = MAX_ROWS, many_rows: bool = True) -> tuple[str, RowKernel]:
    """The kernel an engine uses, by name: `auto` is `compiled` where it runs here, else `transposed`. With
    `many_rows`, bfloat16 on AMX takes any row count (past 32 through packed weights); without, up to 32.
    Raises ValueError for `compiled` where it cannot run (the reason is in the message)."""
    if name not in ("auto", "compiled", "transposed"):
        raise ValueError(f"narrow_kernel must be auto, compiled or transposed, got {name!r}")
    if name != "transposed":
        avx2 = cpu_kernel.skinny_linear()
        if avx2 is not None:
            return "compiled", _compiled(avx2, max_rows, many_rows)
        if name == "compiled":
            raise ValueError(f"narrow_kernel='compiled' cannot run here: {cpu_kernel.why_not()}")
    return "transposed", functools.partial(transposed_linear, max_rows=max_rows)


def _compiled(avx2: cpu_kernel.Kernel, max_rows: int, many_rows: bool = True) -> RowKernel:
    """The AVX-512 kernel where it runs here: float32 up to `max_rows` rows, and bfloat16 on AMX up to
    `MAX_ROWS_BF16` rows (beyond, with `many_rows`, through packed weights); without AMX, bfloat16 through its
    vdpbf16ps path, any number of rows: F.linear's bfloat16 GEMM is not row-invariant on every such CPU (on the
    2-core AMD EPYC a row of 6 gets other bits than alone), and the vdpbf16ps path is row-invariant by construction
    and faster there at 1-32 rows (benchmarks/NOTES.md, session 12). Without the AVX-512 kernel: the AVX2 kernel for
    float32 and F.linear for bfloat16."""
    wide = cpu_kernel.skinny_linear_avx512()
    if wide is None:
        return functools.partial(compiled_linear, avx2, max_rows=max_rows)
    float32 = functools.partial(compiled_linear, wide, max_rows=max_rows)
    if cpu_kernel.amx_in_use():
        bfloat16: RowKernel = functools.partial(amx_linear, many_rows=many_rows)
    else:  # (no packed copies, so no memory to save by a row limit)
        bfloat16 = functools.partial(compiled_linear, wide, max_rows=NO_ROW_LIMIT, dtype=torch.bfloat16)

    def kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bfloat16(x, weight, bias) if x.dtype is torch.bfloat16 else float32(x, weight, bias)

    return kernel


NO_ROW_LIMIT = 1 << 30
# The AVX-512 kernel's operators by name, for compiled callers (engine/captured.py): rows with the weight as it is
# (float32; bfloat16 through AMX up to MAX_ROWS_BF16 rows, else through vdpbf16ps), and bfloat16 on AMX for any row
# count with the weight's packed copy.
AVX512_OP = "baton_avx512::skinny_linear"
AVX2_OP = "baton::skinny_linear"
AMX_PACKED_OP = "baton_avx512::skinny_linear_packed"


def row_kernel_op(name: str, dtype: torch.dtype, lanes: bool = False) -> tuple[str, int] | None:
    """What the engine's row kernel `name` (as `resolve_kernel` resolved it; "off" without one) computes for rows of
    `dtype`, as compiled code can call it: the torch operator ("namespace::name", taking x [rows, in] and the weight;
    "" for F.linear) and up to how many rows that holds, as `_compiled` decides, or with `lanes` as
    `lanes_decode_kernel` does (the caller passes the `lanes_weight` copies). None where it is neither (the
    transposed kernel)."""
    if lanes:
        return AVX512_OP, NO_ROW_LIMIT
    if name == "off":
        return "", NO_ROW_LIMIT
    if name != "compiled" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if cpu_kernel.skinny_linear_avx512() is None:
        return (AVX2_OP, MAX_ROWS) if dtype is torch.float32 else ("", NO_ROW_LIMIT)
    if dtype is torch.float32:
        return AVX512_OP, MAX_ROWS
    # bfloat16: the same operator, on AMX up to its few-rows limit, else its vdpbf16ps path for any row count
    return AVX512_OP, MAX_ROWS_BF16 if cpu_kernel.amx_in_use() else NO_ROW_LIMIT


def lanes_prompt_kernel(dtype: torch.dtype) -> RowKernel | None:
    """Prompts' linears through a compiled kernel's packed lanes (`lanes_weight`), any number of rows, where that beats
    F.linear:
    - float32 on CPUs other than Intel's, where MKL (F.linear's float32 GEMM) runs a generic path: the AVX-512
      kernel on the 2-core AMD EPYC with AVX512-BF16, 300-385 GFLOP/s on prompt shapes against MKL's ~200
      (benchmarks/NOTES.md, session 12); the AVX2 kernel on the AVX2-only EPYC, 144 against 117 at 136 rows and
      two threads (session 16);
    - bfloat16 where AMX is not in use (the AMX kernel has its own prompt path): there F.linear is oneDNN's
      bfloat16 GEMM, 1.3-1.7x slower at 16-96 rows and level at 192 on the EPYC (session 13).
    Its bits do not depend on the rows beside a row or on the thread count, so prompts can share one forward and
    follow the thread tuner. None elsewhere (Intel's MKL is fast; bfloat16 without the AVX-512 kernel; no compiled
    kernel): prompts keep F.linear."""
    from engine.model_loader import cpu_vendor

    wide = cpu_kernel.skinny_linear_avx512()
    if dtype is torch.float32 and cpu_vendor() not in ("GenuineIntel", ""):
        kernel = wide if wide is not None else cpu_kernel.skinny_linear()  # else the AVX2 kernel's packed path
        return None if kernel is None else functools.partial(compiled_linear, kernel, max_rows=NO_ROW_LIMIT, lanes=True)
    if dtype is torch.bfloat16 and wide is not None and not cpu_kernel.amx_in_use():
        return functools.partial(compiled_linear, wide, max_rows=NO_ROW_LIMIT, dtype=torch.bfloat16, lanes=True)
    return None


def lanes_decode_kernel(dtype: torch.dtype) -> RowKernel | None:
    """The decode batch's linears through the AVX-512 kernel with the same `lanes_weight` copies as prompts, any
    number of rows, where prompts take them (`lanes_prompt_kernel` through that kernel): on the 2-core AMD EPYC Zen 4
    the copies run the decode batch's linears 1.2-2.1x faster at 8-16 rows and the output embedding 1.4-1.9x faster
    at any row count (no horizontal sum per output; benchmarks/NOTES.md, session 18). A row then gets the same bits in
    a decode step as in a prompt, and float32 decode rows stay row-invariant past MAX_ROWS. None elsewhere (the AVX2
    kernel, AMX, or prompts on F.linear): the decode batch keeps `resolve_kernel`'s kernel."""
    wide = cpu_kernel.skinny_linear_avx512()
    if wide is None or lanes_prompt_kernel(dtype) is None:
        return None
    return functools.partial(compiled_linear, wide, max_rows=NO_ROW_LIMIT, dtype=dtype, lanes=True)


def lanes_op() -> str:
    """The operator prompt rows run through with `lanes_weight` copies (for compiled callers: engine/captured.py): the
    AVX-512 kernel's where it runs here, else the AVX2 kernel's (float32)."""
    return AVX512_OP if cpu_kernel.skinny_linear_avx512() is not None else AVX2_OP


def lanes_packs(weight: torch.Tensor) -> bool:
    """Whether prompt rows through the AVX-512 kernel's lanes (`lanes_prompt_kernel`) take `weight` as a
    `lanes_weight` copy: [out, in] on CPU, contiguous, out a multiple of 16; bfloat16 (in even, and not where AMX
    takes bfloat16 prompts) or float32 (every linear of the default model)."""
    if weight.dim() != 2 or weight.device.type != "cpu" or not weight.is_contiguous() or weight.shape[0] % 16:
        return False
    if cpu_kernel.skinny_linear_avx512() is None:  # the AVX2 kernel's packed path: float32 only
        return weight.dtype is torch.float32 and cpu_kernel.skinny_linear() is not None
    if weight.dtype is torch.bfloat16:
        return weight.shape[1] % 2 == 0 and not cpu_kernel.amx_in_use()
    return weight.dtype is torch.float32


def lanes_weight(weight: torch.Tensor) -> torch.Tensor:
    """What the AVX-512 kernel takes for `weight` on prompt rows (`lanes_prompt_kernel`, and the captured prefill): its
    copy packed for 16 outputs per vector (`pack_lanes`: each output's chain of products in its own lane, no
    horizontal sum), packed on first use and kept on the weight, where `lanes_packs`; else the weight. Prompt rows are
    compute-bound, where the copy runs faster (bfloat16: 1.3-1.55x on the layers at 40-136 rows); decode rows take
    the same copy through `lanes_decode_kernel` where it is the AVX-512 kernel's."""
    packed = getattr(weight, _LANES, None)  # a weight that packed skips the checks from then on
    if packed is not None:
        return packed
    if not lanes_packs(weight):
        return weight
    with torch.no_grad():  # the pack_lanes of lanes_op's extension (one float32 layout for both kernels)
        packed = getattr(torch.ops, lanes_op().split("::")[0]).pack_lanes(weight.detach())
    setattr(weight, _LANES, packed)
    return packed


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               many_rows: bool = True) -> torch.Tensor | None:
    """bfloat16 `F.linear` through the AVX-512 kernel's AMX paths: up to `MAX_ROWS_BF16` rows with the weight as it
    is, and with `many_rows` beyond, through its packed copy (`packed_weight`, weights that `tiles_fit`). The two
    paths give a row the same bits, so a row's result does not depend on how many rows share the call: prompts can
    be packed into one forward. None where it does not apply (AMX off, another dtype, too many rows)."""
    if not cpu_kernel.amx_in_use():
        return None
    few = compiled_linear(torch.ops.baton_avx512.skinny_linear, x, weight, bias, max_rows=MAX_ROWS_BF16,
                          dtype=torch.bfloat16)
    if few is not None or not many_rows or not tiles_fit(weight):
        return few
    return compiled_linear(_packed_linear, x, weight, bias, max_rows=NO_ROW_LIMIT, dtype=torch.bfloat16)


def tiles_fit(weight: torch.Tensor) -> bool:
    """Whether the many-rows AMX path takes this weight: [out, in] with out % 16 == 0 and in % 32 == 0."""
    return weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0


def _packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.baton_avx512.skinny_linear_packed(x, packed_weight(weight))


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the AMX kernel's tile layout for many rows (pairs of k), packed on first use and kept on the
    weight itself: one more copy of each bfloat16 linear weight that prompts run through."""
    packed = getattr(weight, _PACKED, None)
    if packed is None or packed.device != weight.device:
        with torch.no_grad():
            packed = torch.ops.baton_avx512.pack_weight(weight.detach())
        setattr(weight, _PACKED, packed)
    return packed


class _Active(threading.local):
    kernel: RowKernel | None = None  # per thread: the kernel of the decode forward running on it, if any


class NarrowLinear:
    """The switch shared by every engine on one model: `install` once per model, `active(kernel)` per forward."""

    def __init__(self) -> None:
        self._active = _Active()

    @staticmethod
    def install(model: torch.nn.Module) -> NarrowLinear:
        """The model's switch, installing the forwards on its first call. Modules whose forward is already
        replaced per instance (e.g. accelerate's offloading hooks) are left alone."""
        existing = getattr(model, _ATTR, None)
        if isinstance(existing, NarrowLinear):
            return existing
        narrow = NarrowLinear()
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                module.forward = functools.partial(narrow._forward, module)  # type: ignore[method-assign]
        setattr(model, _ATTR, narrow)
        return narrow

    @contextlib.contextmanager
    def active(self, kernel: RowKernel) -> Iterator[None]:
        """Within this block (this thread only), the model's linears try `kernel` first."""
        self._active.kernel = kernel
        try:
            yield
        finally:
            self._active.kernel = None

    def _forward(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        kernel = self._active.kernel
        if kernel is not None:
            out = kernel(x, module.weight, module.bias)
            if out is not None:
                return out
        return _LINEAR(x, module.weight, module.bias)
