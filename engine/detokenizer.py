"""Incremental detokenisation and stop strings.

Text is produced by decoding a short window of recent tokens and taking what is new, so a multi-byte
character split over several tokens is only emitted once complete. Stop strings are matched over the
accumulated text, across token boundaries; text that could still turn into a stop string is held back, and
the stop string itself is never emitted.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
_CONTEXT = 5  # prompt tokens decoded as context so the first output token gets its leading space right


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # start of the decode window
        self.read = len(self.ids)  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still pending (at the end of a request), complete or not."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT)):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back what might be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped)."""
        if not self.stops:
            return delta, False
        text = self.held + delta
        # The stop string that completes first wins (a stream cut anywhere must give the same answer).
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)[1]], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
