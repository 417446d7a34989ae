"""Pydantic schemas for every knob of the system (the YAML / Serve edge) and the presets in presets/."""

from configs.controller import ControllerConfig, PressureEvent
from configs.engine import EngineConfig
from configs.serve import BatonAppArgs, ControllerKnobs, ReplicaPolicyConfig, ServerConfig

__all__ = [
    "BatonAppArgs",
    "ControllerConfig",
    "ControllerKnobs",
    "EngineConfig",
    "PressureEvent",
    "ReplicaPolicyConfig",
    "ServerConfig",
]
