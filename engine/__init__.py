"""The BATON engine: requests, model runner, KV cache with vector shaping, policies, the step loop, and the
async front used by servers."""

from engine.engine import BatonEngine
from engine.request import RequestOutput, SamplingParams, Usage

__all__ = ["BatonEngine", "RequestOutput", "SamplingParams", "Usage"]
