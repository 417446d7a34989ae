"""The decode batch's LM head on CPU: the same product as the model's, in the orientation MKL runs fast.

`nn.Linear` computes `h @ W.T`. For the LM head's tall weight (vocabulary x hidden, e.g. 49152 x 576) and a
few rows, MKL's kernel for that orientation is slow on this class of CPU: measured with 2 threads (see
benchmarks/NOTES.md), 22-33 ms for 2-8 rows against 9 ms for one row, while `(W @ h.T).T` — the same
numbers, the same weight, no copy — takes 7-13 ms. A decode step at 4 rows costs ~75 ms, so this is a
large share of the thin-batch tail of every mixed workload.

The model stays unmodified: the engine runs the model's own decoder (`model.base_model`) and applies the
model's own `lm_head` weight. `FastLogitsHead.probe` enables this only where it is provably the same
function: a CPU model whose output embedding is a bias-free `nn.Linear` and whose full forward gives the
same logits as decoder + matmul on a probe input (a model that scales or soft-caps its logits fails the
check and keeps the standard path). Floating-point results differ from `nn.Linear`'s only in summation
order, as `nn.Linear`'s own results differ between 1 and 16 rows.
"""

from __future__ import annotations

from typing import Any

import torch

# The fast orientation pays off from 2 rows; one row is a matrix-vector product either way.
MIN_ROWS = 2


class FastLogitsHead:
    """`logits(hidden)` = the model's LM head applied to [rows, hidden] states, with `decoder` to run first."""

    def __init__(self, decoder: Any, weight: torch.Tensor) -> None:
        self.decoder, self.weight = decoder, weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab]."""
        if hidden.shape[0] < MIN_ROWS:
            return torch.nn.functional.linear(hidden, self.weight)
        return torch.mm(self.weight, hidden.contiguous().t()).t()

    @staticmethod
    @torch.no_grad()
    def probe(model: Any, device: torch.device) -> FastLogitsHead | None:
        """The fast head if it computes exactly what the model's forward does here, else None."""
        if device.type != "cpu":
            return None  # cuBLAS has no such gap; keep the model's own path
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        decoder = getattr(model, "base_model", None)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or decoder is None or decoder is model:
            return None
        fast = FastLogitsHead(decoder, head.weight)
        vocab = head.weight.shape[0]
        ids = torch.arange(4 * 3, device=device).reshape(4, 3) % vocab
        try:
            want = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
            got = fast.logits(hidden).float()
        except Exception:  # noqa: BLE001 - any model this path does not fit keeps the standard one
            return None
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()):
            return None
        return fast
