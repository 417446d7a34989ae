"""Prompt logprobs: each prompt token's log-probability given the tokens before it, with its top k
alternatives (vLLM's `prompt_logprobs`; what completions' `echo` with `logprobs` returns for the prompt).

They come from the same forward that computes the prompt's KV (`ModelRunner.prefill` keeping the logits of
every position, not only the last), and only for a request that asks (`SampleSpec.prompt_logprobs`): every
other prefill still computes the last position's logits alone. The logits at position i score token i + 1,
so the first prompt token has none (None, as in vLLM and OpenAI).

The draw stays exactly what it is without prompt logprobs: `last_position_alone` has the output embedding
compute the last position by itself, as a forward keeping only the last position does (one GEMM over all P
positions gives the last row different bits on CPU: a matrix product's rounding depends on its row count).

Numerics as for the sampled tokens' logprobs (`engine/sampler.py:token_logprobs`): log_softmax of the raw
logits in float64. The float64 copy is made `CHUNK` positions at a time, so a long prompt over a large
vocabulary holds at most CHUNK x V float64 values beside its logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from engine.request import TokenLogprobs
from engine.sampler import token_logprobs

CHUNK = 256  # prompt positions per log_softmax


def prompt_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top: int) -> list[TokenLogprobs | None]:
    """From the logits of every position of a prompt, `logits` [P, V] (position i scores token i + 1), each
    prompt token's logprob and its `top` most likely alternatives: [None, token 1's, ..., token P-1's]."""
    assert logits.shape[0] == len(token_ids), "one row of logits per prompt position"
    out: list[TokenLogprobs | None] = [None]
    scored = len(token_ids) - 1  # positions 0..P-2 score tokens 1..P-1; the last position's logits draw
    for start in range(0, scored, CHUNK):
        stop = min(start + CHUNK, scored)
        out += token_logprobs(logits[start:stop], list(token_ids[start + 1:stop + 1]), [top] * (stop - start))
    return out


@contextlib.contextmanager
def last_position_alone(model: Any) -> Iterator[None]:
    """Within it, a forward keeping every position's logits computes the last position's through the output
    embedding alone ([1, 1, H] in), bit for bit what a forward keeping only that position computes; the
    other positions come from one product over them. Whatever the model applies after its output embedding
    (a logit scale, a soft cap) applies to both alike."""
    head = model.get_output_embeddings()

    def split(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        hidden = args[0]  # [batch, positions, hidden]
        if hidden.shape[1] < 2:
            return out
        return torch.cat([out[:, :-1], module.forward(hidden[:, -1:])], dim=1)  # forward: no hook again

    handle = head.register_forward_hook(split)
    try:
        yield
    finally:
        handle.remove()
