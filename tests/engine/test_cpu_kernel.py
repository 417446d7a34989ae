"""The compiled CPU decode kernel (engine/kernels/skinny_linear.cpp via engine/cpu_kernel.py): it builds where
it can, computes F.linear's product, and gives each row the same bits whatever batch it is in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import cpu_kernel
from engine.narrow_linear import MAX_ROWS, MAX_ROWS_BF16, compiled_linear, resolve_kernel


def test_the_compiled_kernel_builds_wherever_it_can_run() -> None:
    """CI must exercise the compiled kernel, not fall back silently: with AVX2 and a C++ compiler it loads."""
    if not cpu_kernel.cpu_supports_it() or shutil.which("c++") is None:
        pytest.skip("no AVX2/FMA or no C++ compiler: the engine uses the transposed kernel here")
    assert cpu_kernel.skinny_linear() is not None, cpu_kernel.why_not()
    assert resolve_kernel("auto")[0] == "compiled"


@pytest.mark.parametrize(("out", "inp"), [(300, 64), (9, 70), (1, 8), (6, 3), (49, 576)])
def test_compiled_kernel_is_f_linear_up_to_summation_order(kernel_f32, out: int, inp: int) -> None:
    """Every branch of the kernel: weight rows in blocks of 4 and the out % 4 rest, input rows in pairs and
    an odd last one, the in % 8 tail (AVX2; AVX-512: rows in fours, the in % 16 tail); a bias, a 3-D input and
    a non-contiguous one."""
    kernel = kernel_f32
    torch.manual_seed(out * 1000 + inp)
    w, b = torch.randn(out, inp), torch.randn(out)
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, inp)
        exact = (x.double() @ w.double().T).float()
        got = kernel(x, w)
        assert got.shape == (rows, out) and got.is_contiguous()
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5 * inp ** 0.5), (rows, (got - exact).abs().max())
    x3 = torch.randn(3, 1, inp)
    assert torch.allclose(compiled_linear(kernel, x3, w, b), torch.nn.functional.linear(x3, w, b), atol=1e-4)
    strided = torch.randn(inp, 5).t()  # [5, inp], not contiguous
    assert torch.allclose(compiled_linear(kernel, strided, w), torch.nn.functional.linear(strided, w), atol=1e-4)


def test_compiled_kernel_gives_a_row_the_same_bits_alone_and_in_any_batch(kernel_f32) -> None:
    """A row's output is the same bits whatever rows share its batch: what makes the decode batch's linears
    batch-invariant. Fails if the kernel mixed rows or its summation order depended on the row count."""
    kernel = kernel_f32
    torch.manual_seed(1)
    w = torch.randn(303, 77)  # out % 4 != 0 and in % 8 != 0: every branch
    x = torch.randn(MAX_ROWS, 77)
    alone = torch.cat([kernel(x[r:r + 1].contiguous(), w) for r in range(MAX_ROWS)])
    for rows in range(1, MAX_ROWS + 1):
        for start in (0, MAX_ROWS - rows):
            got = kernel(x[start:start + rows].contiguous(), w)
            assert torch.equal(got, alone[start:start + rows]), (rows, start)
    old = torch.get_num_threads()
    try:  # nor does it depend on how the weight's rows are split over threads
        torch.set_num_threads(1)
        assert torch.equal(kernel(x, w), alone)
    finally:
        torch.set_num_threads(old)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    """A build killed mid-way leaves torch's lock file, on which every later load would wait forever."""
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_kernel._clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running right now
    old = time.time() - cpu_kernel.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernel._clear_stale_lock(tmp_path)
    assert not lock.exists()
    cpu_kernel._clear_stale_lock(tmp_path)  # and no lock at all is fine


def test_a_build_is_kept_under_a_name_its_content_decides(tmp_path: Path) -> None:
    """The kept copy's name hashes the source, the headers and the flags, not the source's path: a copy of the
    repository elsewhere finds it; any changed byte or flag names another."""
    copy = tmp_path / "kernels"
    shutil.copytree(cpu_kernel.SOURCE.parent, copy)
    build = cpu_kernel.FLOAT32
    moved = cpu_kernel.KernelBuild(build.name, copy / build.source.name, build.flags, build.namespace, build.needs,
                                   build.fallback)
    assert cpu_kernel.prebuilt(moved, tmp_path) == cpu_kernel.prebuilt(build, tmp_path)
    assert cpu_kernel.prebuilt(moved, tmp_path).name.startswith(f"{build.name}.")
    flagged = cpu_kernel.KernelBuild(build.name, moved.source, (*build.flags, "-g"), build.namespace, build.needs,
                                     build.fallback)
    assert cpu_kernel.prebuilt(flagged, tmp_path) != cpu_kernel.prebuilt(build, tmp_path)
    (copy / "work_share.h").write_text((copy / "work_share.h").read_text() + "\n// changed\n")
    assert cpu_kernel.prebuilt(moved, tmp_path) != cpu_kernel.prebuilt(build, tmp_path)


def test_a_copy_of_the_repository_loads_every_kernel_without_building(tmp_path: Path) -> None:
    """What a Ray runtime_env working_dir does: the same code at another path. torch's build system would take the
    new source paths for a change and rebuild (a minute per kernel, per replica); the kept copies load instead."""
    if cpu_kernel.skinny_linear() is None or cpu_kernel.captured_llama() is None:
        pytest.skip(f"no compiled kernels here: {cpu_kernel.why_not() or cpu_kernel.why_not_captured()}")
    repo = Path(cpu_kernel.__file__).resolve().parents[1]
    for part in ("engine", "configs"):
        shutil.copytree(repo / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import torch.utils.cpp_extension as ce\n"
        "def refuse(*a, **k): raise SystemExit('rebuilt: ' + k['name'])\n"
        "ce.load = refuse\n"
        "from engine import cpu_kernel\n"
        f"assert cpu_kernel.__file__.startswith({str(tmp_path)!r}), cpu_kernel.__file__\n"
        "kernels = [cpu_kernel.skinny_linear(), cpu_kernel.skinny_linear_avx512(), cpu_kernel.decode_attention(),\n"
        "           cpu_kernel.captured_llama(), cpu_kernel.work_share()]\n"
        "print([k is not None for k in kernels], cpu_kernel.why_not(), cpu_kernel.why_not_avx512())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "BATON_KERNEL_DIR": str(cpu_kernel.build_dir())}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    here = [k is not None for k in (cpu_kernel.skinny_linear(), cpu_kernel.skinny_linear_avx512(),
                                    cpu_kernel.decode_attention(), cpu_kernel.captured_llama(),
                                    cpu_kernel.work_share())]
    assert done.stdout.strip().startswith(str(here)), done.stdout + done.stderr


def test_a_damaged_kept_copy_is_built_again_and_a_failed_copy_is_only_a_warning(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    """A kept copy that does not load (truncated, another machine's) is replaced by a build, not taken as a missing
    kernel; a copy that cannot be written (a full disk) leaves the process its kernel."""
    if cpu_kernel.work_share() is None:
        pytest.skip(f"no work-sharing pool here: {cpu_kernel.why_not_share()}")
    directory = tmp_path / "k"
    shutil.copytree(cpu_kernel.build_dir(), directory, ignore=shutil.ignore_patterns("lock"))
    kept = cpu_kernel.prebuilt(cpu_kernel.WORK_SHARE, directory)
    good = kept.read_bytes()
    kept.write_bytes(b"not a shared object")
    script = "from engine import cpu_kernel\nprint(cpu_kernel.work_share() is not None, cpu_kernel.why_not_share())\n"
    env = {**os.environ, "BATON_KERNEL_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(cpu_kernel.__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.startswith("True"), done.stdout + done.stderr
    assert "did not load" in done.stderr and kept.read_bytes() == good
    built = directory / f"{cpu_kernel.WORK_SHARE.name}.so"
    monkeypatch.setattr(shutil, "copy2", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with caplog.at_level("WARNING", logger=cpu_kernel.log.name):
        cpu_kernel._keep(built, tmp_path / "other.0123456789abcdef.so")
    assert "could not keep" in caplog.text and not list(tmp_path.glob("other.*"))


def test_build_dir_is_configurable_and_never_an_unwritable_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATON_KERNEL_DIR", str(tmp_path / "k"))
    assert cpu_kernel.build_dir() == tmp_path / "k"
    monkeypatch.delenv("BATON_KERNEL_DIR")
    read_only_env = tmp_path / "env"
    read_only_env.mkdir()
    monkeypatch.setattr(cpu_kernel.sys, "prefix", str(read_only_env))
    monkeypatch.setattr(cpu_kernel.sys, "base_prefix", "/usr")
    assert cpu_kernel.build_dir() == read_only_env / "baton-kernels"  # a writable environment: inside it
    monkeypatch.setattr(cpu_kernel.os, "access", lambda path, mode: False)
    assert cpu_kernel.build_dir() == Path.home() / ".cache" / "baton-kernels"  # read-only: the user's cache


def test_the_avx512_kernel_builds_wherever_the_cpu_has_avx512_bf16() -> None:
    """On a CPU with AVX512-BF16 (where `dtype: auto` picks bfloat16) and a compiler, the AVX-512 kernel loads
    and `auto` routes float32 decode rows through it, and bfloat16 ones: on AMX up to 32 rows (beyond through
    packed weights), elsewhere any number through its vdpbf16ps path."""
    if not cpu_kernel.cpu_supports_avx512() or shutil.which("c++") is None:
        pytest.skip("no AVX512-BF16 or no C++ compiler: bfloat16 decode rows use F.linear here")
    bf16 = cpu_kernel.skinny_linear_avx512()
    assert bf16 is not None, cpu_kernel.why_not_avx512()
    name, row_kernel = resolve_kernel("auto")
    assert name == "compiled"
    x, w = torch.randn(3, 1, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    if cpu_kernel.amx_in_use():  # bfloat16 rows through its AMX path
        assert torch.equal(row_kernel(x, w, None), bf16(x.reshape(3, 64), w).view(3, 1, 32))
        wide = torch.randn(MAX_ROWS_BF16 + 9, 64).bfloat16()  # wider: the packed-weight path, the same bits per row
        assert torch.equal(row_kernel(wide, w, None)[:MAX_ROWS_BF16], bf16(wide[:MAX_ROWS_BF16].contiguous(), w))
    else:  # without AMX, bfloat16 rows through its vdpbf16ps path, any number of them
        assert torch.equal(row_kernel(x, w, None), bf16(x.reshape(3, 64), w).view(3, 1, 32))
        wide = torch.randn(MAX_ROWS_BF16 + 9, 64).bfloat16()
        assert torch.equal(row_kernel(wide, w, None), bf16(wide, w))
    x32, w32 = torch.randn(5, 64), torch.randn(32, 64)  # float32 goes through it too, up to MAX_ROWS
    assert torch.equal(row_kernel(x32, w32, None), bf16(x32, w32))
    assert row_kernel(torch.randn(MAX_ROWS + 1, 64), w32, None) is None


@pytest.mark.parametrize(("out", "inp"), [(1536, 576), (576, 1536), (48, 64), (300, 64), (9, 70), (6, 3)])
def test_bfloat16_kernel_is_the_product_up_to_rounding(kernel_bf16, bf16_path: str, out: int, inp: int) -> None:
    """Each path against the exact product: no further from it than F.linear's own bfloat16 result (plus one
    bfloat16 rounding step). Covers the AMX tile shapes (in % 32, out % 16), the vdpbf16ps tail (in % 32 != 0,
    out % 4 != 0), row counts below, at and past a 16-row tile and a 32-row pair of tiles."""
    torch.manual_seed(out + inp)
    w = torch.randn(out, inp).bfloat16()
    for rows in (1, 2, 3, 5, 15, 16, 17, 32, 33, 50):
        x = torch.randn(rows, inp).bfloat16()
        exact = x.double() @ w.double().T
        got = kernel_bf16(x, w)
        assert got.shape == (rows, out) and got.dtype is torch.bfloat16
        err = (got.double() - exact).abs().max().item()
        ref = (torch.nn.functional.linear(x, w).double() - exact).abs().max().item()
        assert err <= 2 * ref + 1e-2, (bf16_path, rows, err, ref)


def test_bfloat16_kernel_gives_a_row_the_same_bits_alone_and_in_any_batch(kernel_bf16, bf16_path: str) -> None:
    """What keeps bfloat16 decode batch-invariant: a row's bits do not depend on the rows beside it (1-32, any
    position, across the AMX 16-row tiles), nor on the thread split."""
    torch.manual_seed(2)
    rows = MAX_ROWS_BF16
    for out, inp in ((576, 1536), (303, 77)):
        w, x = torch.randn(out, inp).bfloat16(), torch.randn(rows, inp).bfloat16()
        alone = torch.cat([kernel_bf16(x[r:r + 1].contiguous(), w) for r in range(rows)])
        for n in range(1, rows + 1):
            for start in (0, rows - n):
                assert torch.equal(kernel_bf16(x[start:start + n].contiguous(), w), alone[start:start + n]), (n, start)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(kernel_bf16(x, w), alone)
        finally:
            torch.set_num_threads(old)


@pytest.mark.parametrize(("out", "inp"), [(1536, 576), (576, 1536), (48, 64), (208, 96)])
def test_the_packed_weight_path_gives_any_row_count_the_few_rows_bits(kernel_bf16, out: int, inp: int) -> None:
    """Prompts (many rows) go through the weight packed into AMX tiles, x as the A tile: each row gets the bits
    the decode path (at most 32 rows) gives it, for row counts off every tile and pair boundary, and so the same
    bits alone as among any others. What lets prompts share a prefill forward (engine/attention.py)."""
    if not cpu_kernel.use_amx(True):
        pytest.skip("no AMX-BF16 on this CPU (or the OS refused the tile state)")
    torch.manual_seed(out + inp)
    w = torch.randn(out, inp).bfloat16()
    packed = torch.ops.baton_avx512.pack_weight(w)
    x = torch.randn(150, inp).bfloat16()
    few = torch.cat([kernel_bf16(x[r:r + 32].contiguous(), w) for r in range(0, 150, 32)])
    exact = x.double() @ w.double().T
    assert (few.double() - exact).abs().max().item() <= 2 * (torch.nn.functional.linear(x, w).double() - exact).abs().max().item() + 1e-2
    for n in (1, 16, 31, 33, 64, 97, 150):
        got = torch.ops.baton_avx512.skinny_linear_packed(x[:n].contiguous(), packed)
        assert got.shape == (n, out) and torch.equal(got, few[:n]), n
    alone = torch.ops.baton_avx512.skinny_linear_packed(x[70:71].contiguous(), packed)
    assert torch.equal(alone, few[70:71])


def test_float32_prompts_go_through_the_compiled_kernel_off_intel_only(monkeypatch, tmp_path: Path) -> None:
    """`lanes_prompt_kernel(float32)`: on CPUs other than Intel's, float32 prompts take a compiled kernel's packed
    lanes (the AVX-512 kernel's, else the AVX2 kernel's), any number of rows, the bits per row of each row alone;
    on Intel (or an unknown vendor) they keep F.linear."""
    from engine import model_loader, narrow_linear

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx2\n")
    assert model_loader.cpu_vendor(cpuinfo) == "AuthenticAMD"
    assert model_loader.cpu_vendor(tmp_path / "missing") == ""
    if cpu_kernel.skinny_linear() is None:
        assert narrow_linear.lanes_prompt_kernel(torch.float32) is None
        return
    for vendor in ("GenuineIntel", ""):
        monkeypatch.setattr(model_loader, "cpu_vendor", lambda v=vendor: v)
        assert narrow_linear.lanes_prompt_kernel(torch.float32) is None, vendor
    monkeypatch.setattr(model_loader, "cpu_vendor", lambda: "AuthenticAMD")
    kernel = narrow_linear.lanes_prompt_kernel(torch.float32)
    assert kernel is not None
    torch.manual_seed(5)
    w, x = torch.randn(70, 96), torch.randn(300, 96)  # many rows: a whole prompt
    got = kernel(x[None], w, None)
    assert got is not None and got.shape == (1, 300, 70)
    alone = torch.cat([kernel(x[r:r + 1], w, None) for r in (0, 150, 299)])
    assert torch.equal(got[0, [0, 150, 299]], alone)
    assert torch.allclose(got[0], torch.nn.functional.linear(x, w), atol=1e-4)
    assert kernel(x.bfloat16(), w.bfloat16(), None) is None  # float32 only


def test_bfloat16_prompts_go_through_the_avx512_kernel_without_amx(monkeypatch) -> None:
    """`lanes_prompt_kernel(bfloat16)`: without AMX (oneDNN's bfloat16 GEMM is F.linear there, slower for
    chat-sized prompts, and a row's bits depend on its neighbours), prompts take the kernel's vdpbf16ps lanes, any
    number of rows, each row's bits those of the row alone, whatever the vendor; with AMX, the AMX kernel's own
    prompt path (`amx_linear`) is used instead, so none here."""
    from engine import narrow_linear

    if cpu_kernel.skinny_linear_avx512() is None:
        assert narrow_linear.lanes_prompt_kernel(torch.bfloat16) is None
        return
    monkeypatch.setattr(cpu_kernel, "amx_in_use", lambda: True)
    assert narrow_linear.lanes_prompt_kernel(torch.bfloat16) is None
    monkeypatch.setattr(cpu_kernel, "amx_in_use", lambda: False)
    kernel = narrow_linear.lanes_prompt_kernel(torch.bfloat16)
    assert kernel is not None
    torch.manual_seed(6)
    w, x = torch.randn(70, 96).bfloat16(), torch.randn(300, 96).bfloat16()
    got = kernel(x[None], w, None)
    assert got is not None and got.shape == (1, 300, 70) and got.dtype is torch.bfloat16
    alone = torch.cat([kernel(x[r:r + 1], w, None) for r in (0, 150, 299)])
    assert torch.equal(got[0, [0, 150, 299]], alone)
    exact = x.double() @ w.double().T
    assert (got[0].double() - exact).abs().max().item() < 0.1 * exact.abs().max().item()
    assert kernel(x.float(), w.float(), None) is None  # bfloat16 only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out,inp", [(64, 96), (576, 576), (48, 34), (16, 2), (32, 33)])
def test_prompts_use_the_weights_lanes_copies(out: int, inp: int, dtype: torch.dtype, monkeypatch) -> None:
    """`lanes_prompt_kernel` (bfloat16 without AMX; float32 off Intel) takes each packable weight (out % 16 == 0;
    bfloat16: in even) as its `pack_lanes` copy, kept on the weight: the layout is the weight's (bfloat16
    packed[g, i, l, e] = w[16 g + l, 2 i + e], float32 packed[g, k, l, 0] = w[16 g + l, k]), a row's bits are those
    of the row alone at any row count (1-70: every 4-row block and remainder), and the result is the product up to
    rounding (no further from it than F.linear's own result, plus one rounding step). Decode rows keep the weight as
    it is."""
    from engine import narrow_linear

    if cpu_kernel.skinny_linear_avx512() is None and (dtype is torch.bfloat16 or cpu_kernel.skinny_linear() is None):
        pytest.skip("no AVX512-BF16 (bfloat16) or no C++ compiler here")
    ops = torch.ops.baton_avx512 if cpu_kernel.skinny_linear_avx512() is not None else torch.ops.baton
    monkeypatch.setattr(cpu_kernel, "amx_in_use", lambda: False)
    monkeypatch.setattr("engine.model_loader.cpu_vendor", lambda: "AuthenticAMD")
    torch.manual_seed(out + inp)
    w = torch.randn(out, inp).to(dtype)
    if not narrow_linear.lanes_packs(w):
        assert dtype is torch.bfloat16 and inp % 2
        assert narrow_linear.lanes_weight(w) is w
        return
    packed = ops.pack_lanes(w)
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(out, inp), w)
    kernel = narrow_linear.lanes_prompt_kernel(dtype)
    assert kernel is not None
    x = torch.randn(70, inp).to(dtype)
    got = kernel(x, w, None)
    assert got is not None and got.dtype is dtype and torch.equal(narrow_linear.lanes_weight(w), packed)
    alone = torch.cat([ops.skinny_linear(x[r:r + 1].contiguous(), packed) for r in range(70)])
    assert torch.equal(got, alone)
    for n in (1, 2, 3, 5, 17, 33):
        assert torch.equal(kernel(x[:n], w, None), alone[:n]), n
    exact = x.double() @ w.double().T
    ref = (torch.nn.functional.linear(x, w).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * ref + (1e-2 if dtype is torch.bfloat16 else 1e-5)
    decode = narrow_linear.resolve_kernel("compiled")[1]
    assert torch.equal(decode(x[:4], w, None), ops.skinny_linear(x[:4].contiguous(), w))


def _fma_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 y[r, o]: from zero, one fused multiply-add per input k in order, rounded to float32 after each (the
    product of two floats is exact in float64, so each step rounds once, as an FMA does, but for a sum whose float64
    rounding lands on a float32 tie)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for k in range(x.shape[1]):
        acc = (acc + x[:, k : k + 1].double() * w[:, k].double()).float().double()
    return acc.float()


def test_the_avx2_packed_path_is_one_fma_chain_per_output(kernel) -> None:
    """The AVX2 kernel's prompt path (`pack_lanes` copy, float32): each output is one fused multiply-add per input,
    in input order, from zero, whatever the rows beside it or the thread count: equal to that chain emulated here,
    and, where this CPU has the AVX-512 kernel too, bit for bit its packed float32 path (one layout, one chain). A
    chain summed in the reverse order differs (the comparison has teeth; F.linear is no such witness, as MKL's order
    matches this chain on some CPUs)."""
    torch.manual_seed(3)
    w, x = torch.randn(48, 37), torch.randn(11, 37)  # 3 groups of 16; in not a multiple of 8; 4-row blocks and 3 left
    packed = torch.ops.baton.pack_lanes(w)
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(48, 37), w)
    got = torch.ops.baton.skinny_linear(x, packed)
    assert torch.equal(got, _fma_chain(x, w))
    assert not torch.equal(got, _fma_chain(x.flip(1), w.flip(1)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.baton.skinny_linear(x, packed), got)
    finally:
        torch.set_num_threads(before)
    for n in (1, 2, 3, 4, 5, 9):
        assert torch.equal(torch.ops.baton.skinny_linear(x[:n].contiguous(), packed), got[:n]), n
    if cpu_kernel.skinny_linear_avx512() is not None:
        assert torch.equal(torch.ops.baton_avx512.skinny_linear(x, torch.ops.baton_avx512.pack_lanes(w)), got)
