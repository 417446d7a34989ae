"""Typed calls into a running BATON application from another Ray app (or a driver connected to Serve).

    client = BatonClient.for_app("baton")
    answer = await client.generate(ChatCompletionRequest(messages=[...], max_tokens=32))
    async for chunk in client.stream(CompletionRequest(prompt="Hello", max_tokens=32)):
        ...

The requests and responses are the same pydantic objects as the HTTP API's; errors arrive as
`deployments.errors.OpenAIError` with the HTTP status and field, exactly as HTTP would report them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.protocol import EngineStatus, GenerateRequest, GenerateResponse, StreamChunk


class BatonClient:
    """A thin typed wrapper over the `BatonServer` deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    @classmethod
    def for_app(cls, app_name: str = "baton") -> BatonClient:
        """The client for the ingress deployment of the Serve application `app_name`."""
        return cls(serve.get_app_handle(app_name))

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """The whole result (a unary handle call)."""
        result: GenerateResponse = await self._handle.generate.remote(request)
        return result

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Stream chunks as they are generated. Leaving the loop early cancels the request in the engine."""
        response = cast(
            DeploymentResponseGenerator, self._handle.options(stream=True).generate_stream.remote(request)
        )
        try:
            async for chunk in response:
                yield chunk
        finally:
            # Ray does not cancel a response its caller dropped; cancelling it is how the replica learns the
            # caller left. There the cancellation reaches the request's stream, which aborts it through the
            # engine front's one abort path (a no-op once the stream has ended).
            response.cancel()

    async def engine_status(self) -> EngineStatus:
        status: EngineStatus = await self._handle.engine_status.remote()
        return status
