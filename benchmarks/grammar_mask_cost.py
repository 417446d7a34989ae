"""Per-token mask cost of llguidance against xgrammar on the default model's tokenizer (CPU, one thread).

Run each in a throwaway environment (neither has to be in the project's venv for this):

    pip install --target /tmp/gl llguidance
    pip install --target /tmp/gx --no-deps xgrammar apache-tvm-ffi   # torch, transformers: the venv's
    PYTHONPATH=/tmp/gl python -m benchmarks.grammar_mask_cost llg <tokenizer dir>
    PYTHONPATH=/tmp/gx python -m benchmarks.grammar_mask_cost xgr <tokenizer dir>

It walks one valid instance of a 6-property JSON schema token by token and times, at each token, filling the
allowed-token bitmask and applying it to [1, 49152] logits. Results: benchmarks/NOTES.md (issue 11).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
            "address": {"city": "London", "zip": "12345"}, "active": True}


def walk(ids: list[int], fill: Callable[[], None], apply: Callable[[torch.Tensor], None],
         accept: Callable[[int], bool]) -> tuple[list[float], list[float]]:
    """Seconds to fill the mask and to apply it, at each token of `ids`."""
    logits = torch.randn(1, VOCAB)
    fills, applies = [], []
    for t in ids:
        t0 = time.perf_counter()
        fill()
        fills.append(time.perf_counter() - t0)
        masked = logits.clone()
        t0 = time.perf_counter()
        apply(masked)
        applies.append(time.perf_counter() - t0)
        assert masked[0, t] != float("-inf") and accept(t), t
    return fills, applies


def llguidance_run(tok: Any, ids: list[int]) -> tuple[float, list[float], list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
    t0 = time.perf_counter()
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - t0
    bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
    shifts = torch.arange(32, dtype=torch.int32)

    def apply(logits: torch.Tensor) -> None:  # plain torch: no torch.compile on a server's CPU path
        bits = (bitmask[0].view(-1, 1) >> shifts) & 1
        logits[0].masked_fill_(bits.view(-1)[:VOCAB] == 0, float("-inf"))

    fills, applies = walk(ids, lambda: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0), apply,
                          m.consume_token)
    return compile_s, fills, applies


def xgrammar_run(tok: object, ids: list[int]) -> tuple[float, list[float], list[float]]:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB), max_threads=1)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    fills, applies = walk(ids, lambda: m.fill_next_token_bitmask(bitmask),
                          lambda logits: xgr.apply_token_bitmask_inplace(logits, bitmask), m.accept_token)
    return compile_s, fills, applies


def main() -> None:
    which, tokenizer_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode(json.dumps(INSTANCE))
    compile_s, fills, applies = (llguidance_run if which == "llg" else xgrammar_run)(tok, ids)
    f = [x * 1e6 for x in fills]
    a = [x * 1e6 for x in applies]
    print(f"{which}: {len(ids)} tokens, compile {compile_s * 1e3:.1f} ms; mask fill median "
          f"{statistics.median(f):.0f} us (mean {statistics.mean(f):.0f}, max {max(f):.0f}); "
          f"apply to [1, {VOCAB}] logits median {statistics.median(a):.0f} us")


if __name__ == "__main__":
    main()
