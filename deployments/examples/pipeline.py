"""A second Ray app that calls the BATON app through a handle: "summarise, then answer".

Step 1 asks the engine for a short summary of a document (a unary handle call, low priority); step 2
streams an answer to the question from that summary (a streaming handle call, normal priority).

    applications:
      - name: pipeline
        route_prefix: /pipeline
        import_path: deployments.examples.pipeline:build_pipeline
        args: {engine_app: baton}

HTTP: POST /pipeline {"document": "...", "question": "..."}; handle: `run(PipelineRequest)`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from deployments.errors import OpenAIError, from_validation_errors
from deployments.handle import BatonClient
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    StreamOptions,
)


class PipelineArgs(BaseModel):
    """`args` of `build_pipeline`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine_app: str = Field(
        default="baton", min_length=1, description="Name of the Serve app running BatonServer."
    )
    summary_max_tokens: int = Field(default=48, ge=1)
    answer_max_tokens: int = Field(default=48, ge=1)


class PipelineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    document: str = Field(min_length=1)
    question: str = Field(min_length=1)


class PipelineResponse(BaseModel):
    summary: str
    answer: str
    answer_chunks: int = Field(description="How many streamed chunks carried answer text.")
    completion_tokens: int


@serve.deployment(max_ongoing_requests=16)
class SummariseThenAnswer:
    def __init__(self, args: PipelineArgs) -> None:
        self._args = args
        self._client: BatonClient | None = None

    def _engine(self) -> BatonClient:
        # Resolved on first use, so this app may be deployed before (or without restarting with) the engine.
        if self._client is None:
            self._client = BatonClient.for_app(self._args.engine_app)
        return self._client

    async def run(self, request: PipelineRequest) -> PipelineResponse:
        engine = self._engine()
        summary = await engine.generate(
            ChatCompletionRequest(
                messages=[
                    ChatMessage(role="system", content="Summarise the user's text in one or two sentences."),
                    ChatMessage(role="user", content=request.document),
                ],
                max_tokens=self._args.summary_max_tokens,
                temperature=0.0,
                priority=1,  # background work: less urgent than interactive answers
            )
        )
        assert isinstance(summary, ChatCompletionResponse)
        summary_text = summary.choices[0].message.content
        answer: list[str] = []
        tokens = summary.usage.completion_tokens if summary.usage else 0
        async for chunk in engine.stream(
            ChatCompletionRequest(
                messages=[
                    ChatMessage(role="system", content=f"Answer using this summary: {summary_text}"),
                    ChatMessage(role="user", content=request.question),
                ],
                max_tokens=self._args.answer_max_tokens,
                temperature=0.0,
                stream=True,
                stream_options=StreamOptions(include_usage=True),
            )
        ):
            if isinstance(chunk, ChatCompletionChunk):
                answer.extend(c.delta.content for c in chunk.choices if c.delta.content)
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        return PipelineResponse(
            summary=summary_text, answer="".join(answer), answer_chunks=len(answer), completion_tokens=tokens
        )

    async def __call__(self, http_request: Request) -> JSONResponse:
        try:
            request = PipelineRequest.model_validate_json(await http_request.body())
        except ValidationError as e:
            err = from_validation_errors(e.errors())
            return JSONResponse(err.to_response().model_dump(), status_code=err.status_code)
        try:
            result = await self.run(request)
        except OpenAIError as e:  # the engine refused a step: pass its status and message on
            return JSONResponse(e.to_response().model_dump(), status_code=e.status_code, headers=e.headers)
        return JSONResponse(result.model_dump())


def build_pipeline(args: dict[str, Any]) -> Application:
    return SummariseThenAnswer.bind(PipelineArgs.model_validate(args or {}))  # type: ignore[attr-defined]
