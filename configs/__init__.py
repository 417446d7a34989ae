"""Pydantic schemas for every knob of the system (the YAML / Serve edge) and the presets in presets/."""

from configs.controller import ControllerConfig, PressureEvent
from configs.engine import EngineConfig

__all__ = ["ControllerConfig", "EngineConfig", "PressureEvent"]
