"""Turning sampled tokens into streamed outputs: stop conditions, text deltas, finish reasons, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.request import FinishReason, Request, RequestOutput, RequestState, TokenLogprobs, Usage


@dataclass
class _Delta:
    output_id: str  # the id the output carries (a choice's: its request's, `Request.output_id`)
    index: int  # the choice
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None  # one per token id when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, with the first token, when asked


class OutputTracker:
    """Per request: a detokenizer and a stop-string matcher; per step: the deltas to emit."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._stops: dict[str, StopStringMatcher] = {}
        self._pending: dict[str, _Delta] = {}
        self._finished: list[Request] = []

    def track(self, req: Request) -> None:
        """Start following `req`. A resumed request (output tokens already streamed by another replica) replays
        them through its detokenizer and stop matcher, so its text deltas continue exactly where that
        replica's stopped, the text held back for a possible stop string included."""
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        stops = StopStringMatcher(req.params.stop)
        for token in req.output_token_ids:
            stops.feed(detok.push([token]))
        self._detok[req.request_id], self._stops[req.request_id] = detok, stops

    def on_prompt_logprobs(self, req: Request, logprobs: list[TokenLogprobs | None]) -> None:
        """Record a request's prompt logprobs (computed once, with its first token): they go out with it (a
        choice not drawn in that step gets them in an output of their own, before its first token)."""
        self._delta(req).prompt_logprobs = logprobs

    def on_token(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one sampled token (and its logprobs, when the request asked for them); finish the request if
        it hit a stop condition."""
        req.output_token_ids.append(token)
        delta = self._delta(req)
        delta.token_ids.append(token)
        if req.params.logprobs is not None:
            assert logprobs is not None and logprobs.token_id == token, "the runner computes what was asked"
            delta.logprobs = delta.logprobs if delta.logprobs is not None else []
            delta.logprobs.append(logprobs)
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self.finish(req, "stop")  # the stopping token is counted but not rendered as text
            return
        text, hit = self._stops[req.request_id].feed(self._detok[req.request_id].push([token]))
        delta.text += text
        if hit:
            self.finish(req, "stop", stop_string_hit=True)
        elif req.grammar is not None and req.grammar.complete:  # structured output: the match is complete
            self.finish(req, "stop")
        elif req.remaining <= 0:
            self.finish(req, "length")

    def finish(self, req: Request, reason: FinishReason, error: str | None = None,
               stop_string_hit: bool = False) -> None:
        if req.state is RequestState.FINISHED:
            return
        delta = self._delta(req)
        detok, stops = self._detok.pop(req.request_id), self._stops.pop(req.request_id)
        if not stop_string_hit and reason in ("stop", "length"):
            tail, hit = stops.feed(detok.flush())
            delta.text += tail if hit else tail + stops.flush()
        req.state = RequestState.FINISHED
        req.finish_reason, req.error = reason, error
        self._finished.append(req)

    def _delta(self, req: Request) -> _Delta:
        return self._pending.setdefault(req.request_id, _Delta(req.output_id, req.index))

    def drain(self) -> list[RequestOutput]:
        """Everything that happened since the last drain, one output per request (per choice)."""
        finished = {r.request_id: r for r in self._finished}
        outs = []
        for rid, d in self._pending.items():
            req = finished.get(rid)
            outs.append(self._output(d, req))
        for rid, req in finished.items():
            if rid not in self._pending:
                outs.append(self._output(_Delta(req.output_id, req.index), req))
        self._pending.clear()
        self._finished.clear()
        return outs

    @staticmethod
    def _output(d: _Delta, req: Request | None) -> RequestOutput:
        if req is None:
            return RequestOutput(d.output_id, d.token_ids, d.text, logprobs=d.logprobs,
                                 prompt_logprobs=d.prompt_logprobs, index=d.index)
        return RequestOutput(
            d.output_id, d.token_ids, d.text, finished=True, finish_reason=req.finish_reason,
            usage=Usage(len(req.prompt_token_ids), len(req.output_token_ids)), error=req.error,
            logprobs=d.logprobs, prompt_logprobs=d.prompt_logprobs, index=d.index,
        )
