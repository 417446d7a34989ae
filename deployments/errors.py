"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

`OpenAIError` is raised by the serving code on both paths: HTTP turns it into a JSON response; a handle
caller gets it as an exception (Ray re-raises the replica's exception type), with the same fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from configs.errors import FieldError
from deployments.protocol import ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    """A request that cannot be served, with the HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # All constructor arguments go to Exception so the error pickles across Ray processes intact.
        super().__init__(status_code, message, type, param, code, headers)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __str__(self) -> str:
        param = f" (param: {self.param})" if self.param else ""
        return f"{self.status_code} {self.type}: {self.message}{param}"

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


def from_value_error(e: ValueError, default_param: str | None = None) -> OpenAIError:
    """A 400 for a bad value: its field is the `FieldError`'s `param` (the engine's and SamplingParams'
    errors carry one), else `default_param`."""
    param = e.param if isinstance(e, FieldError) else default_param
    return bad_request(str(e), param)


def model_not_found(model: str, served: Sequence[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model {model!r} does not exist; this server serves {list(served)}",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")


def body_too_large(max_bytes: int) -> OpenAIError:
    """413: the request body is over `server.max_body_bytes` (declared in Content-Length, or as sent)."""
    return OpenAIError(
        413,
        f"The request body is larger than this server accepts ({max_bytes} bytes)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def body_timeout(timeout_s: float) -> OpenAIError:
    """408: the whole request body did not arrive within `server.body_timeout_s`."""
    return OpenAIError(
        408,
        f"The request body did not arrive within {timeout_s:g} s",
        "invalid_request_error",
        None,
        "request_timeout",
        {"Connection": "close"},
    )


def invalid_input(param: str, e: Exception) -> OpenAIError:
    """400: the tokenizer or the chat template could not process this field's text."""
    return bad_request(f"{param}: the tokenizer could not process it ({type(e).__name__}: {e})", param)


def request_id_in_use(request_id: str) -> OpenAIError:
    """409: a client's X-Request-Id names a request that is still running."""
    return OpenAIError(
        409,
        f"X-Request-Id {request_id!r} belongs to a request that is still running; use a new id",
        "invalid_request_error",
        "X-Request-Id",
        "duplicate_request_id",
    )


def engine_unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, "server_error", None, "engine_unavailable", {"Retry-After": "1"})


def overloaded(limit: int, retry_after_s: int) -> OpenAIError:
    """429: the replica already holds its `max_pending_requests`; the client should retry later."""
    return OpenAIError(
        429,
        f"The server is at capacity ({limit} requests in progress on this replica); retry after "
        f"{retry_after_s} s",
        "rate_limit_error",
        None,
        "server_overloaded",
        {"Retry-After": str(retry_after_s)},
    )


def engine_failed(message: str) -> OpenAIError:
    return OpenAIError(500, message, "server_error", None, "engine_error")


def from_validation_errors(errors: Sequence[Any]) -> OpenAIError:
    """A 400 from pydantic / FastAPI validation errors, naming the field(s).

    `errors` are pydantic error dicts; FastAPI prefixes locations with "body".
    """
    parts: list[str] = []
    first_param: str | None = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # pydantic puts union member names in the location ("prompt.str"); they confuse more than help.
        loc = [p for p in loc if p not in ("str", "int", "list[int]", "list[str]", "list[list[int]]")]
        field = ".".join(loc) or None
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not part of this API)"
        if err.get("type") == "json_invalid":
            field, msg = None, f"request body is not valid JSON: {msg}"
        if not field and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msg = "the request body must be a JSON object (Content-Type: application/json)"
        first_param = first_param or field
        parts.append(f"{field}: {msg}" if field else msg)
    # Unions report one error per member; keep each distinct message once, in order.
    unique = list(dict.fromkeys(parts))
    return bad_request("; ".join(unique) or "invalid request", first_param)
