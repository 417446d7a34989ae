"""The marker of a live knob: a config field that may change while the engine serves.

A field is live when it is declared with `json_schema_extra=LIVE`; every list of live knobs (the engine's
`validate_knobs`, the deployment's `user_config` schema) is derived from these markers with `live_fields`.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.config import JsonDict

LIVE: JsonDict = {"live": True}


def live_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Names of `model`'s fields marked live, in declaration order."""
    return tuple(
        name for name, field in model.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("live") is True
    )
