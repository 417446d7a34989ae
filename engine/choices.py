"""A request's n choices (OpenAI's `n`): n engine requests over one prompt, each its own seed stream.

Choice i of the request submitted as `r` is the engine request `choice_id(r, i)`; choice 0 keeps `r`, so a
request with n = 1 is exactly a plain request. Each choice equals a solo run of the prompt with that choice's
seed: with an explicit seed s, choice i samples with seed s + i (`choice_params`); without one, the engine
derives choice i's seed from its id, as for a solo request with that id. The scheduler prefills the waiting
choices whose tokens are identical once and gives each a copy of the KV (engine/scheduler.py, `Prefill.siblings`);
the front merges their outputs into one stream tagged with `RequestOutput.index` (engine/streams.py). The
prompt logprobs (`SamplingParams.prompt_logprobs`) are computed once, by choice 0's first prefill, and go out
to every choice that has no token yet (each choice's stream gets them once, before or with its first token).

A continuation after a failover (deployments/remote_engine.py) runs only the unfinished choices, each after the
tokens it already streamed: `resume_token_ids` given as {choice index: tokens}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from configs.errors import FieldError
from engine.request import SamplingParams

MAX_CHOICES = 16  # OpenAI's n is unbounded in its schema; vLLM and this server cap it

# What to resume after: one choice's tokens (a plain request), or {choice index: its tokens} for the choices to run.
Resume = Sequence[int] | Mapping[int, Sequence[int]]


def choice_id(request_id: str, index: int) -> str:
    """The engine's id of choice `index` of request `request_id` (choice 0 keeps the request's id)."""
    return request_id if index == 0 else f"{request_id}#{index}"


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s parameters: seed s + index for an explicit seed s; otherwise the same seed (the engine
    derives each choice's seed from its own id). Only choice 0 asks for the prompt logprobs: they are the
    prompt's, computed once for the request, and the scheduler hands them to every choice (`Scheduler.update`)."""
    if index == 0:
        return params
    seed = None if params.seed is None else params.seed + index
    return replace(params, seed=seed, prompt_logprobs=None)


def check_n(n: object) -> int:
    """`n` if it is an integer in [1, MAX_CHOICES], else a FieldError naming `n`."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise FieldError("n", f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")
    return n


def choices_to_run(n: int, resume: Resume = ()) -> dict[int, list[int]]:
    """Which choices to run, each with the output tokens it already has, by index. A mapping names the
    choices to run (a continuation: the finished ones are left out); a sequence is choice 0's tokens, so it
    must be empty for n > 1. FieldError naming `n` or `resume_token_ids`."""
    check_n(n)
    if isinstance(resume, Mapping):
        bad = [i for i in resume if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad or not resume:
            raise FieldError("resume_token_ids", f"resume_token_ids must map choice indices in [0, {n}) to the "
                             f"tokens each already has, got keys {sorted(resume, key=str)[:5]}")
        return {i: list(resume[i]) for i in sorted(resume)}
    if resume and n != 1:
        raise FieldError("resume_token_ids", "with n > 1, give resume_token_ids by choice index")
    return {i: list(resume) if i == 0 else [] for i in range(n)}
