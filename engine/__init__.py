"""The BATON engine: requests, model runner, KV cache with vector shaping, policies, the step loop, and the
async front used by servers.

Imports are lazy so that `import engine.request` (plain data types) does not pull in torch/transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from configs.errors import FieldError
from engine.request import RequestOutput, SamplingParams, Usage
from engine.streams import RequestStream

if TYPE_CHECKING:
    from engine.async_engine import AsyncBatonEngine
    from engine.engine import BatonEngine

__all__ = ["AsyncBatonEngine", "BatonEngine", "FieldError", "RequestOutput", "RequestStream", "SamplingParams",
           "Usage"]

_LAZY = {"AsyncBatonEngine": "engine.async_engine", "BatonEngine": "engine.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
