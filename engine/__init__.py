"""The BATON engine: requests, model runner, KV cache with vector shaping, policies, the step loop, and the
async front used by servers."""

from engine.async_engine import AsyncBatonEngine, RequestStream
from engine.engine import BatonEngine
from engine.request import RequestOutput, SamplingParams, Usage

__all__ = ["AsyncBatonEngine", "BatonEngine", "RequestStream", "RequestOutput", "SamplingParams", "Usage"]
