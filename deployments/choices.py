"""A request's n choices as the serving layer sees them: the engine's outputs gathered per choice
(`RequestOutput.index`), the usage of them all (the prompt once, the completions summed), and `best_of`'s
ranking by cumulative logprob (docs/architecture.md, "n choices").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from deployments.protocol import UsageInfo
from engine.request import RequestOutput, TokenLogprobs


@dataclass
class ChoiceOutput:
    """One choice's whole output: its text, its tokens' logprobs and its final output."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # echo's: the output that carried them
    last: RequestOutput | None = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


class ChoiceOutputs:
    """The outputs of a request's choices, gathered per choice, for a response sent whole."""

    def __init__(self) -> None:
        self._by_index: dict[int, ChoiceOutput] = {}

    def add(self, out: RequestOutput) -> None:
        choice = self._by_index.setdefault(out.index, ChoiceOutput(out.index))
        choice.text.append(out.text)
        choice.logprobs.extend(out.logprobs or ())
        choice.prompt_logprobs = choice.prompt_logprobs or out.prompt_logprobs
        if out.finished:
            choice.last = out

    def best(self, n: int) -> list[ChoiceOutput]:
        """The `n` choices to return, in the order to number them: all of them by index when `n` is all
        there are; else (`best_of`) the `n` of highest cumulative logprob, best first (ties: lower index)."""
        choices = sorted(self._by_index.values(), key=lambda c: c.index)
        if n >= len(choices):
            return choices
        return sorted(choices, key=lambda c: -c.cumulative_logprob)[:n]

    def usage(self) -> UsageInfo | None:
        return summed_usage(c.last for c in self._by_index.values() if c.last is not None)


def summed_usage(finals: Iterable[RequestOutput]) -> UsageInfo | None:
    """The usage of a request from its choices' final outputs: the prompt counted once (the choices share
    it, and it is computed once), the completion tokens of every choice generated (best_of's too) summed."""
    usages = [out.usage for out in finals if out.usage is not None]
    if not usages:
        return None
    prompt = usages[0].prompt_tokens
    completion = sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
