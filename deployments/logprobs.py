"""Shaping the engine's `TokenLogprobs` into OpenAI's two logprobs shapes.

* chat: `choices[].logprobs.content[]`, one `{token, logprob, bytes, top_logprobs: [...]}` per token;
* completions (legacy): `choices[].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}`; offsets run on across the chunks of a stream, so the shaper keeps the count.

A token's text is the tokenizer's decoding of that one token (a byte of a multi-byte character decodes to
U+FFFD, as in vLLM). A logprob of -inf (a logit the model masked) is sent as -9999.0, vLLM's convention: JSON
has no infinity.
"""

from __future__ import annotations

from typing import Any

from deployments.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from engine.request import TokenLogprobs

FLOOR = -9999.0  # what -inf is sent as


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


class LogprobsShaper:
    """One request's logprobs, shaped chunk by chunk (or all at once) for chat or completions."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._offset = 0  # characters of completion text before the next token (completions' text_offset)

    def _text(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id]))

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self._text(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))

    def chat(self, logprobs: list[TokenLogprobs]) -> ChatLogprobs:
        content = []
        for lp in logprobs:
            chosen = self._top(lp.token_id, lp.logprob)
            top = [self._top(t, v) for t, v in lp.top]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _offsets(self, tokens: list[str]) -> list[int]:
        offsets = []
        for text in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return offsets

    def continue_at(self, offset: int) -> None:
        """The next token's text starts at `offset` (after an echoed prompt's text)."""
        self._offset = offset

    def prompt(self, token_ids: list[int], logprobs: list[TokenLogprobs | None], top: int) -> CompletionLogprobs:
        """An echoed prompt's logprobs: an entry per token, null for a token with none (the first), each with
        at most `top` alternatives (the engine may have computed more)."""
        tokens = [self._text(t) for t in token_ids]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if lp is None else _finite(lp.logprob) for lp in logprobs],
            top_logprobs=[None if lp is None else {self._text(t): _finite(v) for t, v in lp.top[:top]}
                          for lp in logprobs],
            text_offset=self._offsets(tokens),
        )

    def completion(self, logprobs: list[TokenLogprobs]) -> CompletionLogprobs:
        tokens = [self._text(lp.token_id) for lp in logprobs]
        offsets = self._offsets(tokens)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[_finite(lp.logprob) for lp in logprobs],
            top_logprobs=[{self._text(t): _finite(v) for t, v in lp.top} for lp in logprobs],
            text_offset=offsets,
        )
