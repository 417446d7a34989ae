"""BatchKVCache against a shadow model (docs/architecture.md, "The cache"), driven by hypothesis.

The shadow keeps, per request, the key/value vectors written to it in order and the mask pattern of every
column it has seen since it joined (right-aligned, like the cache). After every operation the cache must pass
`check_invariants()` and agree with the shadow on content, mask, positions, window length and bytes.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.kv_cache import ATTENTION_ALIGN, BatchKVCache, RowKV, attention_width

LAYERS, HEADS, DIM = 2, 2, 4
DTYPE = torch.float64
MAX_ROWS = 6


def new_cache(row_capacity: int = 2, col_capacity: int = 1) -> BatchKVCache:
    # col_capacity rounds up to 64 columns: small enough that inserts and steps force relayouts.
    return BatchKVCache(LAYERS, HEADS, DIM, DTYPE, torch.device("cpu"), row_capacity=row_capacity,
                        col_capacity=col_capacity)


def rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DTYPE) + 3.0  # never zero: padding must be told apart


def rand_row(seed: int, length: int) -> RowKV:
    """A request's KV: keys/values [layers, heads, length, dim]."""
    return RowKV(rand(seed, LAYERS, HEADS, length, DIM), rand(seed + 1, LAYERS, HEADS, length, DIM))


class Shadow:
    """What each request's row must hold: its real vectors (oldest first) and its column mask pattern."""

    def __init__(self) -> None:
        self.keys: dict[str, list[torch.Tensor]] = {}  # per token: [layers, heads, dim]
        self.values: dict[str, list[torch.Tensor]] = {}
        self.pattern: dict[str, list[bool]] = {}  # mask of every column since it joined, oldest first

    def add(self, rid: str, kv: RowKV) -> None:
        self.keys[rid] = [kv.keys[:, :, i] for i in range(kv.length)]
        self.values[rid] = [kv.values[:, :, i] for i in range(kv.length)]
        self.pattern[rid] = [True] * kv.length

    def drop(self, rid: str) -> None:
        del self.keys[rid], self.values[rid], self.pattern[rid]

    def append(self, rid: str, real: list[bool], keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [layers, heads, T, dim] as written for this row; only real columns count."""
        for t, is_real in enumerate(real):
            if is_real:
                self.keys[rid].append(keys[:, :, t])
                self.values[rid].append(values[:, :, t])
        self.pattern[rid].extend(real)

    def row(self, rid: str) -> RowKV:
        return RowKV(torch.stack(self.keys[rid], dim=2), torch.stack(self.values[rid], dim=2))

    def span(self, rid: str) -> int:
        """Columns from the row's oldest real token to the newest column."""
        pat = self.pattern[rid]
        return len(pat) - pat.index(True)


def check_against_shadow(cache: BatchKVCache, shadow: Shadow) -> None:
    cache.check_invariants()
    assert sorted(cache.ids) == sorted(shadow.keys)
    n, length = cache.rows, cache.length
    assert cache.positions() == [len(shadow.keys[rid]) for rid in cache.ids]
    # The window is exactly as wide as the widest row's real span: trimmed, never wider.
    assert length == max((shadow.span(rid) for rid in cache.ids), default=0)
    assert cache.used_bytes() == n * length * cache.bytes_per_token
    assert cache.bytes_per_token == 2 * LAYERS * HEADS * DIM * 8
    mask = cache.mask_view()
    assert tuple(mask.shape) == (n, length)
    for r, rid in enumerate(cache.ids):
        pat = shadow.pattern[rid]
        if len(pat) >= length:
            assert not any(pat[: len(pat) - length]), "a real column fell out of the window"
            expected = pat[len(pat) - length :]
        else:
            expected = [False] * (length - len(pat)) + pat
        assert mask[r].tolist() == expected, (rid, mask[r].tolist(), expected)
        got, want = cache.extract(rid), shadow.row(rid)
        assert torch.equal(got.keys, want.keys), rid
        assert torch.equal(got.values, want.values), rid
        # Padded columns hold zeros in values too, not only in keys (check_invariants covers keys).
        for layer in range(LAYERS):
            _, v = cache.layer_view(layer)
            assert not v[r][:, ~mask[r]].any(), f"{rid}: padded values not zero"


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = new_cache()
        self.shadow = Shadow()
        self.swapped: dict[str, RowKV] = {}
        self.counter = 0
        self.relayouts = 0

    def _new_id(self) -> str:
        self.counter += 1
        return f"r{self.counter}"

    @initialize(row_capacity=st.integers(1, 3))
    def init_cache(self, row_capacity: int) -> None:
        self.cache = new_cache(row_capacity)

    def _step(self, real: torch.Tensor, seed: int) -> None:
        """One forward of the batch: real [rows, T]; writes garbage at padded positions, as a model does."""
        n, t = real.shape
        cap = self.cache.col_capacity
        self.cache.set_step_mask(real)
        self.relayouts += self.cache.col_capacity != cap
        new_k = rand(seed, LAYERS, n, HEADS, t, DIM)
        new_v = rand(seed + 7, LAYERS, n, HEADS, t, DIM)
        for layer in range(LAYERS):
            self.cache.write_layer(layer, new_k[layer], new_v[layer])
            k, v = self.cache.layer_view(layer, extra=t)  # the old window + the new columns
            assert torch.equal(k[:, :, -t:], new_k[layer]) and torch.equal(v[:, :, -t:], new_v[layer])
            # What attention sees: the same, widened on the left to an aligned width by masked zero columns.
            ka, va = self.cache.layer_view(layer, extra=t, aligned=True)
            width, wider = ka.shape[2], ka.shape[2] - k.shape[2]
            assert width == attention_width(k.shape[2]) and width % ATTENTION_ALIGN == 0
            assert torch.equal(ka[:, :, wider:], k) and torch.equal(va[:, :, wider:], v)
            assert not ka[:, :, :wider].any() and not va[:, :, :wider].any()
        aligned_mask = self.cache.mask_view(extra=t, aligned=True)
        assert not aligned_mask[:, : aligned_mask.shape[1] - self.cache.length - t].any()
        ids = list(self.cache.ids)
        self.cache.advance(t)
        for r, rid in enumerate(ids):
            self.shadow.append(rid, real[r].tolist(), new_k[:, r], new_v[:, r])

    @precondition(lambda self: self.cache.rows < MAX_ROWS)
    @rule(length=st.integers(1, 20), seed=st.integers(0, 2**20))
    def insert(self, length: int, seed: int) -> None:
        rid, kv = self._new_id(), rand_row(seed, length)
        self.cache.insert(rid, kv)
        self.shadow.add(rid, kv)

    @precondition(lambda self: self.cache.rows > 0)
    @rule(seed=st.integers(0, 2**20), steps=st.integers(1, 4))
    def decode_steps(self, seed: int, steps: int) -> None:
        for i in range(steps):
            self._step(torch.ones(self.cache.rows, 1, dtype=torch.bool), seed + 31 * i)
            self.cache.check_invariants()

    @precondition(lambda self: self.cache.rows < MAX_ROWS)
    @rule(data=st.data(), seed=st.integers(0, 2**20))
    def wide_step(self, data: st.DataObject, seed: int) -> None:
        """orca: prompts join inside the batch forward; running rows only have their last column real."""
        joining = data.draw(st.integers(1, MAX_ROWS - self.cache.rows), label="joining")
        lengths = data.draw(st.lists(st.integers(1, 12), min_size=joining, max_size=joining), label="lengths")
        t = max(lengths)
        running = self.cache.rows
        for _ in lengths:
            rid = self._new_id()
            self.cache.insert(rid, RowKV.empty_like(self.cache))
            self.shadow.add(rid, RowKV.empty_like(self.cache))
        real = torch.zeros(self.cache.rows, t, dtype=torch.bool)
        real[:running, -1] = True
        for j, k in enumerate(lengths):
            real[running + j, t - k :] = True
        self._step(real, seed)

    @precondition(lambda self: self.cache.rows > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.cache.ids)), label="remove")
        self.cache.remove(rid)
        self.shadow.drop(rid)

    @precondition(lambda self: self.cache.rows > 0)
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        """Preemption by swap: extract the row (it stays until removed), then remove it."""
        rid = data.draw(st.sampled_from(sorted(self.cache.ids)), label="swap_out")
        rows = self.cache.rows
        kv = self.cache.extract(rid).to("cpu")
        assert self.cache.rows == rows and rid in self.cache.ids, "extract must not remove the row"
        assert torch.equal(kv.keys, self.shadow.row(rid).keys)
        self.cache.remove(rid)
        self.swapped[rid] = kv
        self.shadow.drop(rid)

    @precondition(lambda self: self.swapped and self.cache.rows < MAX_ROWS)
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.swapped)), label="swap_in")
        kv = self.swapped.pop(rid)
        self.cache.insert(rid, kv)
        self.shadow.add(rid, kv)  # holes are gone: the row comes back contiguous

    @invariant()
    def agrees_with_shadow(self) -> None:
        check_against_shadow(self.cache, self.shadow)


CacheMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBatchKVCacheAgainstShadow = CacheMachine.TestCase


# ---- targeted cases ------------------------------------------------------------------------------------


def _decode(cache: BatchKVCache, shadow: Shadow, seed: int) -> None:
    n = cache.rows
    cache.set_step_mask(torch.ones(n, 1, dtype=torch.bool))
    k, v = rand(seed, LAYERS, n, HEADS, 1, DIM), rand(seed + 1, LAYERS, n, HEADS, 1, DIM)
    for layer in range(LAYERS):
        cache.write_layer(layer, k[layer], v[layer])
    ids = list(cache.ids)
    cache.advance(1)
    for r, rid in enumerate(ids):
        shadow.append(rid, [True], k[:, r], v[:, r])


def test_relayout_growth_keeps_content() -> None:
    cache, shadow = new_cache(row_capacity=1), Shadow()
    cap_cols, cap_rows = cache.col_capacity, cache.row_capacity
    for i, length in enumerate((5, 17, 3)):
        kv = rand_row(100 + i, length)
        cache.insert(f"a{i}", kv)
        shadow.add(f"a{i}", kv)
        check_against_shadow(cache, shadow)
    assert cache.row_capacity >= 3 > cap_rows
    for i in range(150):  # well past the initial 64 columns
        _decode(cache, shadow, 1000 + i)
        check_against_shadow(cache, shadow)
    assert cache.col_capacity > cap_cols
    assert cache.length == 17 + 150


def test_trim_after_removing_longest_row_shrinks_length() -> None:
    cache, shadow = new_cache(row_capacity=4), Shadow()
    for rid, length in (("short", 3), ("long", 15), ("mid", 7)):
        kv = rand_row(len(rid), length)
        cache.insert(rid, kv)
        shadow.add(rid, kv)
    _decode(cache, shadow, 5)
    assert cache.length == 16
    cache.remove("long")
    shadow.drop("long")
    check_against_shadow(cache, shadow)
    assert cache.length == 8  # mid: 7 + 1 step
    cache.remove("mid")
    assert cache.length == 4
    cache.remove("short")
    assert cache.length == 0 and cache.rows == 0 and cache.used_bytes() == 0
    cache.check_invariants()


def test_longer_prompt_left_pads_existing_rows() -> None:
    cache, shadow = new_cache(row_capacity=2), Shadow()
    a = rand_row(1, 4)
    cache.insert("a", a)
    shadow.add("a", a)
    _decode(cache, shadow, 2)
    b = rand_row(3, 12)
    cache.insert("b", b)
    shadow.add("b", b)
    check_against_shadow(cache, shadow)
    assert cache.length == 12
    mask = cache.mask_view()
    assert mask[0].tolist() == [False] * 7 + [True] * 5  # "a" left-padded by 12 - 5
    assert mask[1].all()
    assert cache.positions() == [5, 12]
    for layer in range(LAYERS):
        k, v = cache.layer_view(layer)
        assert not k[0, :, :7].any() and not v[0, :, :7].any()
        assert torch.equal(k[1], b.keys[layer])
    # A shorter prompt takes a row without moving the window.
    c = rand_row(4, 2)
    cache.insert("c", c)
    shadow.add("c", c)
    check_against_shadow(cache, shadow)
    assert cache.length == 12 and cache.mask_view()[2].tolist() == [False] * 10 + [True] * 2


def test_wide_step_holes_and_extract() -> None:
    """An orca-style join leaves holes in running rows; extract skips them and returns the real tokens only."""
    cache, shadow = new_cache(row_capacity=2), Shadow()
    a = rand_row(9, 3)
    cache.insert("a", a)
    shadow.add("a", a)
    cache.insert("j", RowKV.empty_like(cache))
    shadow.add("j", RowKV.empty_like(cache))
    real = torch.tensor([[False, False, False, True], [False, True, True, True]])
    cache.set_step_mask(real)
    k, v = rand(10, LAYERS, 2, HEADS, 4, DIM), rand(11, LAYERS, 2, HEADS, 4, DIM)
    for layer in range(LAYERS):
        cache.write_layer(layer, k[layer], v[layer])
    cache.advance(4)
    shadow.append("a", real[0].tolist(), k[:, 0], v[:, 0])
    shadow.append("j", real[1].tolist(), k[:, 1], v[:, 1])
    check_against_shadow(cache, shadow)
    assert cache.positions() == [4, 3]
    assert cache.mask_view()[0].tolist() == [True] * 3 + [False] * 3 + [True]
    out = cache.extract("a")
    assert out.length == 4 and torch.equal(out.keys[:, :, 3], k[:, 0, :, 3])


def test_attention_width_aligns_to_the_kernel_blocks() -> None:
    assert [attention_width(w) for w in (1, 32, 33, 500, 512, 513, 1024, 1025)] == [
        32, 32, 64, 512, 512, 1024, 1024, 1536]


def test_aligned_window_past_one_kernel_block_is_zero_padded() -> None:
    """Past 512 columns the aligned window grows by whole blocks; the columns it adds are masked zeros."""
    cache, shadow = new_cache(row_capacity=2), Shadow()
    for rid, length in (("long", 500), ("short", 20)):
        kv = rand_row(len(rid), length)
        cache.insert(rid, kv)
        shadow.add(rid, kv)
    for i in range(20):
        _decode(cache, shadow, 50 + i)
        check_against_shadow(cache, shadow)
    assert cache.length == 520
    k, _ = cache.layer_view(0, extra=1, aligned=True)
    mask = cache.mask_view(extra=1, aligned=True)
    assert k.shape[2] == mask.shape[1] == 1024
    assert not k[:, :, : 1024 - 521].any() and not mask[:, : 1024 - 521].any()
