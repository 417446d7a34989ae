"""Structured output: a request's constraint (a JSON schema, a regex or a list of choices) as a grammar, and
the per-request matcher that says which tokens may come next. Built on llguidance (benchmarks/NOTES.md says
why llguidance and what a mask costs).

* `grammar_of` turns a constraint into llguidance's grammar text and checks that it compiles, without a
  tokenizer: `SamplingParams` calls it, so the ingress, which holds no model, refuses a bad schema or regex
  (FieldError naming the field) before anything reaches an engine.
* `Grammars` (one per engine) builds a request's `GrammarMatcher` from its constraint and the output
  tokens it already has, replayed: a new request starts from none, a failover continuation from its
  `resume_token_ids`, a request preempted by recompute from what it generated (it drops its matcher with its
  KV and rebuilds both when it is prefilled again).
* The runner masks each constrained row's logits with its matcher (`engine/sampler.py:mask_disallowed`)
  and advances the matcher with the token drawn; the output tracker ends the request ("stop") once the
  grammar is complete. EOS is allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance

from configs.errors import FieldError

if TYPE_CHECKING:  # no torch at runtime: SamplingParams (and so the ingress) import this module
    import torch

# The SamplingParams fields that hold a constraint; a request has at most one.
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice")


def grammar_of(field: str, value: str | tuple[str, ...]) -> str:
    """llguidance's grammar text for the constraint `value` of SamplingParams field `field` (a JSON schema
    as JSON text, a regex, or the choices), checked to compile; else a FieldError naming `field`."""
    if field == "json_schema":
        assert isinstance(value, str)
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise FieldError(field, f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise FieldError(field, f"json_schema must be a JSON object, got {type(schema).__name__}")
        # Compact JSON, no whitespace between tokens: free whitespace lets a small model emit newlines and
        # spaces until max_tokens (seen with SmolLM2 and with random weights). A schema's "x-guidance" overrides it.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    elif field == "regex":
        assert isinstance(value, str)
        grammar = llguidance.LLMatcher.grammar_from_regex(value)
    else:
        assert field == "choice" and isinstance(value, tuple)
        grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise FieldError(field, f"{field} does not compile: {error.strip()}")
    return grammar


class GrammarMatcher:
    """One request's position in its grammar: which tokens may come next, advanced one token at a time."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into `out`, int32 [ceil(V / 32)] on CPU, contiguous: bit t % 32 of
        word t // 32 is set when token t is allowed."""
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def advance(self, token: int) -> str | None:
        """Consume `token`; None, or why the grammar refuses it (the matcher then stays in error)."""
        if self._matcher.consume_token(token):
            return None
        return _first_line(self._matcher.get_error()) or f"token {token} does not match the grammar"

    @property
    def complete(self) -> bool:
        """The grammar admits nothing more (its match is complete, or EOS was consumed)."""
        return bool(self._matcher.is_stopped())


class Grammars:
    """Builds matchers over the engine's tokenizer. llguidance's view of the tokenizer is built on the first
    constrained request (~0.5 s for a 49k vocabulary), never for an engine that has none."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf, self.vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()  # make_request runs on callers' threads
        self._live: weakref.WeakSet[GrammarMatcher] = weakref.WeakSet()

    @property
    def live(self) -> int:
        """Matchers still referenced by anything (a leak check for tests: 0 once every request ended)."""
        return len(self._live)

    def matcher(self, field: str, grammar: str, tokens: Sequence[int] = ()) -> GrammarMatcher:
        """A matcher for `grammar` (SamplingParams field `field`) that has consumed `tokens`, the request's
        output so far. FieldError naming `field` if the grammar cannot run on this tokenizer, naming
        `resume_token_ids` if `tokens` do not follow the grammar."""
        m = llguidance.LLMatcher(self._llg_tokenizer(field), grammar, log_level=0)
        if m.is_error():
            raise FieldError(field, f"{field} cannot be used with this model's tokenizer: "
                             f"{_first_line(m.get_error())}")
        if tokens and not m.consume_tokens(list(tokens)):
            raise FieldError("resume_token_ids", f"resume_token_ids do not follow the request's {field}: "
                             f"{_first_line(m.get_error())}")
        matcher = GrammarMatcher(m)
        self._live.add(matcher)
        return matcher

    def _llg_tokenizer(self, field: str) -> llguidance.LLTokenizer:
        import llguidance.hf  # imports transformers: only where a model is

        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                                   eos_token=self._eos or None)
                except (ValueError, TypeError, RuntimeError) as e:
                    raise FieldError(field, f"{field}: structured output is not available for this model's "
                                     f"tokenizer ({e})") from None
            return self._tokenizer


def _first_line(error: str) -> str:
    """llguidance's error without the parser state it appends (dozens of lines)."""
    return error.strip().splitlines()[0] if error.strip() else ""
