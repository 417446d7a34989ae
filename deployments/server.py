"""`BatonIngress`: the HTTP ingress deployment (FastAPI + handle API). It holds no model.

It owns everything that is HTTP: the API key (checked before the body is read), the body limits, validation
and tokenization (in worker threads, off the event loop), the admission limit with OpenAI-shaped 429s, and
SSE. Requests run on the engine deployment (deployments/engine_server.py) through its handle, wrapped by
`RemoteEngine` (deployments/remote_engine.py), which continues a request on another engine replica when
its replica dies mid-stream. HTTP routes and handle methods share `OpenAIServing`, so both paths validate,
generate and fail the same way.

HTTP: POST /v1/completions, POST /v1/chat/completions (SSE when `stream`), GET /v1/models[/{id}],
POST /tokenize, POST /detokenize (vLLM's shapes), GET /health (503 while no engine replica is ready),
GET /stats, GET /metrics (Prometheus text). CORS for `ServerConfig.allowed_origins` (off by default). The POST routes check the API key from the headers before they read the body,
and read it under `ServerConfig.max_body_bytes` / `body_timeout_s` (deployments/http_body.py).
Handles: `generate(request)`, `generate_stream(request)` (with `handle.options(stream=True)`),
`engine_status()`.

No `from __future__ import annotations` here: FastAPI must see the route parameters' real types through
Serve's ingress wrapper (with string annotations, `request: Request` became a required query parameter).
"""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments import errors, exposition, thread_policy
from deployments.engine_server import EngineReplicaStatus
from deployments.errors import OpenAIError
from deployments.http_body import RequestModel, decode_json, parse_request, read_body, validate_request
from deployments.metrics import ServerMetrics
from deployments.protocol import (
    REQUEST_ID_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EngineStatus,
    GenerateRequest,
    GenerateResponse,
    StreamChunk,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
    check_request_id,
)
from deployments.remote_engine import RemoteEngine
from deployments.serving import OpenAIServing, RequestTiming

log = logging.getLogger("ray.serve")

app = FastAPI(title="BATON on Ray Serve", description="OpenAI-compatible LLM server with BATON re-batching.")


class CorsGate:
    """CORS for the origins in `ServerConfig.allowed_origins` (Starlette's CORSMiddleware), and nothing at
    all while there are none. Added to the app at import; the ingress sets the origins when it starts (one
    ingress per replica process)."""

    origins: tuple[str, ...] = ()

    def __init__(self, asgi: ASGIApp) -> None:
        self._app = asgi
        self._cors: tuple[tuple[str, ...], ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origins = CorsGate.origins
        if not origins or scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if self._cors is None or self._cors[0] != origins:
            self._cors = (origins, CORSMiddleware(self._app, allow_origins=list(origins),
                                                  allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                                                  expose_headers=[REQUEST_ID_HEADER], max_age=600))
        await self._cors[1](scope, receive, send)


app.add_middleware(CorsGate)


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.to_response().model_dump(), status_code=e.status_code, headers=e.headers)


@app.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(errors.from_validation_errors(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error_response(
        OpenAIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind)
    )


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the client's mistake: still answered in the OpenAI shape (Starlette logs the traceback).
    return _error_response(
        OpenAIError(500, f"internal error: {type(exc).__name__}", "server_error", None, "internal_error")
    )


async def _sse(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[str]:
    """OpenAI's server-sent events: one `data: <chunk>` per chunk, an error event if the engine fails
    mid-stream (the status line is already sent), then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except OpenAIError as e:
        yield f"data: {e.to_response().model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _parse_generate_request(request: GenerateRequest | dict[str, Any]) -> GenerateRequest:
    """Handle callers may pass the typed request or its dict (chat if it has `messages`)."""
    if isinstance(request, (CompletionRequest, ChatCompletionRequest)):
        return request
    if not isinstance(request, dict):
        raise errors.bad_request(
            f"expected a CompletionRequest, ChatCompletionRequest or dict, got {type(request).__name__}"
        )
    kind: type[GenerateRequest] = ChatCompletionRequest if "messages" in request else CompletionRequest
    return validate_request(request, kind)


def _client_request_id(request: Request) -> str | None:
    """The `X-Request-Id` header, checked (a 400 naming the header), or None when there is none."""
    return _checked_id(request.headers.get(REQUEST_ID_HEADER))


def _checked_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.bad_request(f"{REQUEST_ID_HEADER} must be a string, got {type(value).__name__}", REQUEST_ID_HEADER)
    try:
        return check_request_id(value)
    except ValueError as e:
        raise errors.bad_request(str(e), REQUEST_ID_HEADER) from None


def _runtime_env_vars() -> dict[str, str]:
    """The variables Ray's runtime_env set for this replica (Ray's runtime-env agent logs them)."""
    env = ray.get_runtime_context().runtime_env or {}
    return dict(env.get("env_vars") or {})


HEALTH_TIMEOUT_S = 1.0  # /health answers within this: an engine replica that does not reply is not ready


@serve.deployment(
    name="BatonIngress",
    # Above server.max_pending_requests (24), so the ingress's own OpenAI-shaped 429 binds first and spare
    # slots remain for refusals, /health and /stats; no proxy queue limit, so Ray never answers a burst
    # with its plain-text 429 (the ingress refuses the excess in microseconds; see serve_config.yaml).
    max_ongoing_requests=32,
    max_queued_requests=-1,
    backpressure_config={"status_code": 429, "retry_after_s": 1},
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 0},  # no model: it must not take the engine replicas' CPUs
)
@serve.ingress(app)
class BatonIngress:
    """The HTTP front of the application: auth, limits, validation, tokenization, admission, SSE, failover."""

    def __init__(self, engine: DeploymentHandle, engine_config: EngineConfig,
                 server_config: ServerConfig | None = None) -> None:
        self._replica = serve.get_replica_context().replica_id.unique_id
        if engine_config.batch_serving_threads:
            thread_policy.batch_threads()
        self._engine = engine
        self._engine_config = engine_config
        self._server_config = server_config or ServerConfig()
        self._api_key = self._server_config.resolved_api_key(_runtime_env_vars())
        self._model_name = self._server_config.model_name_for(engine_config.model)
        CorsGate.origins = tuple(self._server_config.allowed_origins)
        self._metrics = ServerMetrics(self._model_name)
        self._serving: OpenAIServing | None = None
        self._backend: RemoteEngine | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self, wait_s: float | None = None) -> OpenAIServing:
        """The serving over the engine deployment, once an engine replica has described its engine (its
        tokenizer and limits); a 503 if none does within `wait_s` (default: the failover timeout)."""
        if self._serving is not None:
            return self._serving
        wait_s = self._server_config.failover_timeout_s if wait_s is None else wait_s
        async with self._connecting:
            if self._serving is None:
                try:
                    description = await asyncio.wait_for(self._engine.describe.remote(), wait_s)
                except Exception as e:  # noqa: BLE001 - none ready (timeout) or the one asked died
                    raise errors.engine_unavailable(f"no engine replica is ready: {type(e).__name__}") from None
                config = self._server_config
                self._backend = RemoteEngine(self._engine, description, config.failover_timeout_s,
                                             config.max_failovers)
                self._serving = OpenAIServing(self._backend, self._server_config, self._on_finish)
        return self._serving

    async def _engine_ready(self) -> str | None:
        """None when an engine replica answers that it serves, within HEALTH_TIMEOUT_S; else why not."""
        try:
            ready = await asyncio.wait_for(self._engine.ready.remote(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            return f"no engine replica answered within {HEALTH_TIMEOUT_S:g} s"
        except Exception as e:  # noqa: BLE001 - the replica asked has died
            return f"no engine replica is ready ({type(e).__name__})"
        return None if ready else "the engine replica's loop is not running"

    # -- HTTP ------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        reason = await self._engine_ready()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def http_metrics(self) -> Response:
        """The `ray_baton_*` metrics of every node, in Prometheus text format (open, like /health)."""
        pages = await asyncio.to_thread(exposition.node_pages)
        return Response(exposition.merge_families(pages), media_type=exposition.CONTENT_TYPE)

    @app.get("/stats")
    async def http_stats(self, request: Request) -> EngineStatus:
        self._authorize(request)
        return await self.engine_status()

    @app.get("/v1/models")
    async def http_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse((await self._connected()).models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def http_model(self, model_id: str, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse((await self._connected()).model_card(model_id).model_dump())

    @app.post("/v1/completions")
    async def http_completions(self, request: Request) -> Response:
        self._authorize(request)
        client_id = _client_request_id(request)
        return await self._respond(await self._read(request, CompletionRequest), client_id)

    @app.post("/v1/chat/completions")
    async def http_chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        client_id = _client_request_id(request)
        return await self._respond(await self._read(request, ChatCompletionRequest), client_id)

    @app.post("/tokenize")
    async def http_tokenize(self, request: Request) -> Response:
        self._authorize(request)
        data = decode_json(await self._read_raw(request))
        kind: type[TokenizeRequest] = (
            TokenizeChatRequest if isinstance(data, dict) and "messages" in data else TokenizeCompletionRequest
        )
        serving = await self._connected()
        return JSONResponse((await serving.tokenize(validate_request(data, kind))).model_dump())

    @app.post("/detokenize")
    async def http_detokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._read(request, DetokenizeRequest)
        return JSONResponse((await (await self._connected()).detokenize(body)).model_dump())

    async def _read(self, request: Request, kind: type[RequestModel]) -> RequestModel:
        """The body as a typed request, read only after the key was checked, within the body limits."""
        return parse_request(await self._read_raw(request), kind)

    async def _read_raw(self, request: Request) -> bytes:
        config = self._server_config
        return await read_body(request, config.max_body_bytes, config.body_timeout_s)

    async def _respond(self, body: GenerateRequest, client_id: str | None) -> Response:
        """The response. The request's id is the `X-Request-Id` header's: Serve's proxy sets one when the client
        did not, and echoes it on every response (so this code adds no second copy). Without a proxy in front
        (no header), a fresh id."""
        serving = await self._connected()
        request_id = client_id or serving.new_request_id(body)
        if body.stream:
            chunks = await serving.generate_stream(body, request_id)  # raises before the 200 is sent
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        result = await serving.generate(body, request_id)
        return JSONResponse(result.model_dump())

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        ):
            raise errors.unauthorized("Incorrect API key provided")

    # -- handle API (other Ray apps: serve.get_app_handle(app_name)) -------------------------------------

    async def generate(
        self, request: GenerateRequest | dict[str, Any], request_id: str | None = None
    ) -> GenerateResponse:
        """The whole result of a completion or chat request. Raises `OpenAIError` like HTTP's 4xx/5xx.
        `request_id`: the caller's id for it (as HTTP's X-Request-Id); None: a fresh one."""
        serving = await self._connected()
        return await serving.generate(_parse_generate_request(request), _checked_id(request_id))

    async def generate_stream(
        self, request: GenerateRequest | dict[str, Any], request_id: str | None = None
    ) -> AsyncIterator[StreamChunk]:
        """Typed stream chunks; call with `handle.options(stream=True)`. Cancelling aborts the request."""
        serving = await self._connected()
        chunks = await serving.generate_stream(_parse_generate_request(request), _checked_id(request_id))
        async for chunk in chunks:
            yield chunk

    async def engine_status(self) -> EngineStatus:
        """One engine replica's live view, with this ingress's admission counters."""
        try:
            engine: EngineReplicaStatus = await asyncio.wait_for(self._engine.status.remote(), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout, or the replica asked died
            raise errors.engine_unavailable(f"no engine replica is ready: {type(e).__name__}") from None
        admission = self._serving.admission if self._serving is not None else None
        return EngineStatus(
            healthy=engine.healthy,
            model=self._model_name,
            replica=engine.replica,
            node_id=engine.node_id,
            pid=engine.pid,
            metrics={
                **engine.metrics,
                "server_requests_in_flight": float(admission.in_flight if admission else 0),
                "server_requests_refused_total": float(admission.refused if admission else 0),
                "server_failovers_total": float(self._backend.failovers if self._backend else 0),
            },
            config=engine.config,
        )

    def _on_finish(self, timing: RequestTiming) -> None:
        self._metrics.observe_request(timing.ttft_s, timing.tpot_s, timing.e2e_s, timing.finish_reason)
