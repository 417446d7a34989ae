"""Completions' `echo`: the prompt before the completion, as OpenAI's legacy completions and vLLM return it.

* Each choice's text starts with the prompt's text (the client's string, or the decoding of its token ids);
  streamed, the choice's first chunk carries it.
* With `logprobs: k` the engine is asked for the prompt logprobs too (`SamplingParams.prompt_logprobs`,
  engine/prompt_logprobs.py), computed once for the request and sent to each of its n choices once, with or
  before the choice's first token (engine/choices.py); each choice's logprobs list the prompt tokens first
  (the first with a null logprob and null alternatives), then the generated ones, and `text_offset` indexes
  the echoed text: the generated tokens' offsets continue after the prompt's text.
* `max_tokens: 0` (evaluation harnesses score a prompt so): the engine draws one token, as vLLM does, which is
  dropped; the choice is the prompt alone, finish_reason "length", and usage counts no completion token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deployments.logprobs import LogprobsShaper
from deployments.protocol import CompletionLogprobs
from engine.request import RequestOutput, TokenLogprobs, Usage


@dataclass
class Echo:
    """One completion request's echo, for each of its choices; `apply` each engine output to it in order, and
    `shape` each choice's logprobs through that choice's own shaper."""

    prompt_text: str
    prompt_token_ids: list[int]
    generate: bool  # False: max_tokens=0, only the prompt is returned
    logprobs: int | None  # the request's `logprobs` (None: no logprobs at all)
    _sent: set[int] = field(default_factory=set)  # the choices whose prompt has gone out (with their first output)

    def apply(self, out: RequestOutput) -> RequestOutput:
        """`out` as the client sees it: each choice's first output is prefixed with the prompt's text; without
        generation, nothing generated is kept and the final output says "length" and 0 completion tokens."""
        first = out.index not in self._sent
        self._sent.add(out.index)
        text = out.text if self.generate else ""
        if first:
            text = self.prompt_text + text
        if self.generate:
            return replace(out, text=text)
        usage = None if out.usage is None else Usage(out.usage.prompt_tokens, 0)
        reason = "length" if out.finish_reason in ("stop", "length") else out.finish_reason
        return replace(out, new_token_ids=[], text=text, logprobs=[] if out.logprobs is not None else None,
                       usage=usage, finish_reason=reason)

    def shape(self, shaper: LogprobsShaper, generated: list[TokenLogprobs] | None,
              prompt: list[TokenLogprobs | None] | None) -> CompletionLogprobs | None:
        """The completion logprobs of `apply`ed outputs: the prompt's first (`prompt`, from the output that
        carries them), then the `generated` tokens'. None: the request asked for no logprobs."""
        if self.logprobs is None:
            return None
        if prompt is None:
            return shaper.completion(generated) if generated is not None else None
        return join(self.shape_prompt(shaper, prompt), shaper.completion(generated or []))

    def shape_prompt(self, shaper: LogprobsShaper, prompt: list[TokenLogprobs | None]) -> CompletionLogprobs:
        assert len(prompt) == len(self.prompt_token_ids), "one entry per prompt token"
        shaped = shaper.prompt(self.prompt_token_ids, prompt, self.logprobs or 0)
        shaper.continue_at(len(self.prompt_text))  # generated tokens' offsets index the echoed text
        return shaped


def join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    """`a`'s tokens, then `b`'s."""
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)
