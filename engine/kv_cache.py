"""The batched KV cache with vector shaping (docs/architecture.md, "The cache").

Layout: one preallocated buffer for all layers,
    keys/values  [layers, row_capacity, kv_heads, col_capacity, head_dim]
    mask         [row_capacity, col_capacity]  (True = real token)
The live batch is rows [0, rows) and the column window [start, end). It is **left-padded**: every row's newest
cached token sits in column end-1, so a decode step writes one new column at `end` for all rows at once.
A row's position id is the number of real tokens it holds, so padding never shifts RoPE.

Attention sees an **aligned window**: the live window widened on the left, with masked zero columns, to
`attention_width(L)` columns (docs/architecture.md, "Batch invariance"). CPU attention kernels reduce over the
columns in vector lanes and blocks counted from the window's left edge, so a row's result depends on where its
columns sit relative to that edge; with the width aligned, a row's columns sit at the same offsets whatever
the batch's window is, and its attention output is bit-identical alone or in any batch. So that the widening
is free, everything outside the window is kept zero and masked: every column left of `start` in every row slot,
and every column of a slot that holds no row. Columns from `end` on are written before they are read.

Operations touch only the rows and columns they change: inserting writes the new row; removing moves the last
row into the freed slot and zeroes the slot it left; trimming advances `start`. Only when the window runs out
of headroom is it relaid into a (possibly larger) buffer, so the cost of that copy is amortised over many steps.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

_ALIGN = 64  # column capacity granularity

# Attention's column alignment (measured, torch 2.13 CPU: benchmarks/NOTES.md, "bf16 batch invariance"). SDPA's
# CPU flash kernel sums a row's softmax weights in 16-lane vectors and runs the keys in blocks of 512 columns
# from the window's left edge; its output for one row is bit-identical under left padding by a multiple of 16
# while the window stays within one block, and by a multiple of 512 beyond. (AVX2's 8 lanes divide 16.)
ATTENTION_ALIGN = 32
ATTENTION_BLOCK = 512


def attention_width(width: int) -> int:
    """Columns attention sees for a window of `width`: a multiple of ATTENTION_ALIGN up to one block, else a
    multiple of ATTENTION_BLOCK, so a row's columns keep their offsets within the kernel's lanes and blocks
    whatever width the batch has. A row alone and in a batch then get the same bits (tests/engine/
    test_batch_invariance.py)."""
    if width <= ATTENTION_BLOCK:
        return -(-width // ATTENTION_ALIGN) * ATTENTION_ALIGN
    return -(-width // ATTENTION_BLOCK) * ATTENTION_BLOCK


@dataclass
class RowKV:
    """One request's cache outside the batch (the prefilled pool or swapped out to host).

    keys/values: [layers, kv_heads, length, head_dim]; real tokens only, oldest first.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    def to(self, device: torch.device | str) -> RowKV:
        return RowKV(self.keys.to(device), self.values.to(device))

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @staticmethod
    def empty_like(cache: BatchKVCache) -> RowKV:
        """A row with no tokens yet (its prompt will be computed inside the batch forward)."""
        shape = (cache.num_layers, cache.kv_heads, 0, cache.head_dim)
        z = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
        return RowKV(z, z)


class BatchKVCache:
    """Left-padded batched KV cache. Rows are addressed by request id; row indices are internal."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, row_capacity: int, col_capacity: int = 256) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self._alloc(row_capacity, _round_up(col_capacity))
        self.start = self.end = self.col_capacity // 4  # window [start, end) inside the buffer
        self.ids: list[str] = []  # request id of each live row, by row index
        self.real: list[int] = []  # real (unmasked) tokens per row == the row's next position id
        self.first: list[int] = []  # absolute column of each row's oldest real token

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        """Window length L: columns every row attends (real or padded)."""
        return self.end - self.start

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes of one token of one row, all layers, keys and values."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.keys.element_size()

    def used_bytes(self) -> int:
        """Bytes the live window occupies (padding included: it is real memory traffic)."""
        return self.rows * self.length * self.bytes_per_token

    def length_without(self, request_ids: Collection[str]) -> int:
        """Window length L once these rows are removed and the window trimmed (what `remove` would leave)."""
        keep = [f for rid, f in zip(self.ids, self.first, strict=True) if rid not in request_ids]
        return self.end - min(keep) if keep else 0

    def reserved_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.mask.nbytes

    def row_of(self, request_id: str) -> int:
        return self.ids.index(request_id)

    def attention_start(self, extra: int = 0) -> int:
        """First column of the aligned window attention sees in a step that adds `extra` columns."""
        return self.end + extra - attention_width(self.length + extra)

    # ---- views used by the forward pass --------------------------------------------------------
    def layer_view(self, layer: int, extra: int = 0, aligned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` for the live rows over [start, end + extra): [rows, H, L+extra, D]; with
        `aligned`, over the aligned window [attention_start(extra), end + extra) that attention sees."""
        n, s, e = self.rows, self.attention_start(extra) if aligned else self.start, self.end + extra
        return self.keys[layer, :n, :, s:e], self.values[layer, :n, :, s:e]

    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write new columns for all live rows at [end, end + T); keys/values: [rows, H, T, D]."""
        t = keys.shape[2]
        assert self.end + t <= self.col_capacity, "reserve() columns before the forward pass"
        self.keys[layer, : self.rows, :, self.end : self.end + t] = keys
        self.values[layer, : self.rows, :, self.end : self.end + t] = values

    def mask_view(self, extra: int = 0, aligned: bool = False) -> torch.Tensor:
        """[rows, L + extra] bool, True where a row has a real token (with `aligned`, over the aligned window)."""
        s = self.attention_start(extra) if aligned else self.start
        return self.mask[: self.rows, s : self.end + extra]

    def positions(self) -> list[int]:
        return list(self.real)

    # ---- growth --------------------------------------------------------------------------------
    def reserve(self, new_cols: int, rows: int | None = None, left: int = 0) -> None:
        """Make room for `new_cols` columns on the right, `left` on the left, and `rows` rows."""
        rows = self.rows if rows is None else rows
        need = self.length + new_cols + left
        widen = attention_width(need) - need  # zero columns the aligned window adds on the left
        if (self.end + new_cols <= self.col_capacity and self.start - left - widen >= 0
                and rows <= self.row_capacity):
            return
        cols = max(self.col_capacity, _round_up(2 * (need + widen)))
        self._relayout(max(rows, self.row_capacity), cols, left_headroom=left + widen + (cols - need - widen) // 4)

    def advance(self, cols: int) -> None:
        """Commit `cols` columns written at `end` by the forward pass.

        The caller has already set `mask[:, end:end+cols]` (see `set_step_mask`); positions and first-column
        bookkeeping follow the mask.
        """
        m = self.mask[: self.rows, self.end : self.end + cols]
        if cols > 1:  # padded input positions wrote finite garbage: zero it to keep padding inert
            pad = ~m
            if bool(pad.any()):
                sl, keep = slice(self.end, self.end + cols), m[None, :, None, :, None]
                self.keys[:, : self.rows, :, sl] = torch.where(keep, self.keys[:, : self.rows, :, sl], 0)
                self.values[:, : self.rows, :, sl] = torch.where(keep, self.values[:, : self.rows, :, sl], 0)
        counts = m.sum(dim=1).tolist()
        for r, c in enumerate(counts):
            if c and self.real[r] == 0:
                self.first[r] = self.end + int(m[r].nonzero()[0])
            self.real[r] += int(c)
        self.end += cols

    def set_step_mask(self, pattern: torch.Tensor) -> None:
        """Set the mask of the next `pattern.shape[1]` columns for the live rows; pattern: [rows, T] bool."""
        t = pattern.shape[1]
        self.reserve(t)
        self.mask[: self.rows, self.end : self.end + t] = pattern

    # ---- vector shaping --------------------------------------------------------------------------
    def insert(self, request_id: str, kv: RowKV) -> None:
        """Embed a request's KV as a new row (docs/architecture.md, "The cache")."""
        assert request_id not in self.ids, f"{request_id} already has a row"
        p, n = kv.length, self.rows
        grow = max(p - self.length, 0)
        self.reserve(0, rows=n + 1, left=grow)
        # Left-pad every running row by `grow`: the exposed columns were outside the window, so already zero
        # and masked, as is the new row's slot; only its tokens are written, on the right.
        self.start -= grow
        e = self.end
        self.keys[:, n, :, e - p : e] = kv.keys.to(self.device, self.dtype)
        self.values[:, n, :, e - p : e] = kv.values.to(self.device, self.dtype)
        self.mask[n, e - p : e] = True
        self.ids.append(request_id)
        self.real.append(p)
        self.first.append(e - p if p else e)

    def extract(self, request_id: str) -> RowKV:
        """Copy out one row's real tokens (oldest first), e.g. to swap it to host. The row stays."""
        r = self.row_of(request_id)
        s, e = self.start, self.end
        cols = self.mask[r, s:e].nonzero().squeeze(1) + s
        if cols.numel() == e - self.first[r]:  # contiguous (no holes): a plain slice
            sl = slice(self.first[r], e)
            return RowKV(self.keys[:, r, :, sl].clone(), self.values[:, r, :, sl].clone())
        return RowKV(self.keys[:, r].index_select(2, cols), self.values[:, r].index_select(2, cols))

    def remove(self, request_id: str) -> None:
        """Remove a row (docs/architecture.md, "The cache"): the last row moves into its slot, then trim."""
        r, last = self.row_of(request_id), self.rows - 1
        s, e = self.start, self.end
        if r != last:
            self.keys[:, r, :, s:e] = self.keys[:, last, :, s:e]
            self.values[:, r, :, s:e] = self.values[:, last, :, s:e]
            self.mask[r, s:e] = self.mask[last, s:e]
            self.ids[r], self.real[r], self.first[r] = self.ids[last], self.real[last], self.first[last]
        # The slot left behind holds no row: zero it, so it can take a row, and its columns can leave the window.
        self.keys[:, last, :, s:e] = 0
        self.values[:, last, :, s:e] = 0
        self.mask[last, s:e] = False
        self.ids.pop()
        self.real.pop()
        self.first.pop()
        self.trim()

    def trim(self) -> None:
        """Drop leading columns no remaining row uses (docs/architecture.md, "The cache")."""
        if not self.ids:
            self.start = self.end
            return
        self.start = max(self.start, min(self.first))

    # ---- internals -------------------------------------------------------------------------------
    def _alloc(self, rows: int, cols: int) -> None:
        shape = (self.num_layers, rows, self.kv_heads, cols, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.mask = torch.zeros((rows, cols), dtype=torch.bool, device=self.device)
        self.row_capacity, self.col_capacity = rows, cols

    def _relayout(self, rows: int, cols: int, left_headroom: int) -> None:
        """Move the live window into a buffer of `rows` x `cols`, starting at column `left_headroom`."""
        old_k, old_v, old_m = self.keys, self.values, self.mask
        n, s, e = self.rows, self.start, self.end
        if rows != self.row_capacity or cols != self.col_capacity:
            self._alloc(rows, cols)
        else:  # same size: copy the window out first, since source and target may overlap; then start from zeros
            old_k, old_v, old_m = (old_k[:, :n, :, s:e].clone(), old_v[:, :n, :, s:e].clone(),
                                   old_m[:n, s:e].clone())
            s, e = 0, e - s
            for buf in (self.keys, self.values, self.mask):
                buf.zero_()
        ns = left_headroom
        ne = ns + (e - s)
        self.keys[:, :n, :, ns:ne] = old_k[:, :n, :, s:e]
        self.values[:, :n, :, ns:ne] = old_v[:, :n, :, s:e]
        self.mask[:n, ns:ne] = old_m[:n, s:e]
        shift = ns - self.start
        self.first = [f + shift for f in self.first]
        self.start, self.end = ns, ne

    def check_invariants(self) -> None:
        """Assert the layout rules; tests call this after every operation."""
        n, s, e = self.rows, self.start, self.end
        assert 0 <= s <= e <= self.col_capacity, (s, e, self.col_capacity)
        assert n <= self.row_capacity
        assert len(self.ids) == len(set(self.ids)) == len(self.real) == len(self.first)
        if n == 0:
            return
        m = self.mask[:n, s:e]  # [rows, L]
        assert m.sum(1).tolist() == self.real, (m.sum(1).tolist(), self.real)
        assert min(self.real) >= 1, f"a row has no real token: {self.real}"
        assert bool(m[:, -1].all()), "every row's newest token must sit in the last column"
        first = (m.to(torch.int8).argmax(dim=1) + s).tolist()  # first True per row
        assert first == self.first, (first, self.first)
        # Masked columns hold zeros, so no NaN/inf can leak through a zero attention weight; that includes the
        # columns the aligned window adds on the left of the next decode step (outside the window: zero, masked).
        a = max(self.attention_start(extra=1), 0)  # (reserve() makes room for all of it before the step)
        assert not bool(self.mask[:n, a:s].any()), "columns left of the window must be masked"
        for buf in (self.keys, self.values):
            nonzero = (buf[:, :n, :, a:e] != 0).any(dim=4).any(dim=2).any(dim=0)  # [rows, L + widening]
            assert not bool((nonzero[:, s - a :] & ~m).any()), "padded cache columns must be zero"
            assert not bool(nonzero[:, : s - a].any()), "columns left of the window must be zero"
        assert s == min(self.first), "leading columns no row uses must be trimmed"


def _round_up(n: int) -> int:
    return max(_ALIGN, -(-n // _ALIGN) * _ALIGN)
