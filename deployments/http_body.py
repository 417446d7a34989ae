"""An HTTP request's body, read under a size and a time limit, and parsed into a typed request.

The routes read the body themselves (not through FastAPI's body parameter) so that the API key is checked
from the headers first, and so that a client sending its body slowly, or too much of it, is answered with
an OpenAI-shaped 408 or 413 instead of holding one of the replica's request slots indefinitely.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from deployments import errors

RequestModel = TypeVar("RequestModel", bound=BaseModel)


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body of `request`: a 413 past `max_bytes` (declared or sent), a 408 if it has not all
    arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise errors.body_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise errors.body_too_large(max_bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise errors.body_timeout(timeout_s) from None
    except ClientDisconnect:  # nobody will read the answer; it only has to end the request quietly
        raise errors.bad_request("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(raw: bytes, kind: type[RequestModel]) -> RequestModel:
    """`raw` JSON as a `kind` request, or a 400 naming the field. Python's JSON parser is used because it
    reads a lone surrogate escape (legal JSON) into the string, so the 400 names the field it is in."""
    return validate_request(decode_json(raw), kind)


def decode_json(raw: bytes) -> Any:
    """`raw` as a JSON value, or a 400."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise errors.bad_request(f"request body is not valid JSON: {e}") from None


def validate_request(data: Any, kind: type[RequestModel]) -> RequestModel:
    """A decoded JSON value (or a handle caller's dict) as a `kind` request, or a 400 naming the field."""
    if not isinstance(data, dict):
        raise errors.bad_request(
            "the request body must be a JSON object (Content-Type: application/json), "
            f"got {type(data).__name__}"
        )
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise errors.from_validation_errors(e.errors()) from None
