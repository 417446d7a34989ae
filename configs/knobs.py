"""The live knobs, derived from the `LIVE` marker on the config fields, and how a set of them is checked.

`EngineConfig` fields marked live are engine knobs; `ControllerConfig` fields marked live are controller
knobs (nested under `controller`). Knobs are given flat, by field name, as in the deployment's `user_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from configs.controller import ControllerConfig
from configs.engine import EngineConfig
from configs.errors import FieldError
from configs.live import live_fields

ENGINE_KNOBS: frozenset[str] = frozenset(live_fields(EngineConfig))
CONTROLLER_KNOBS: frozenset[str] = frozenset(live_fields(ControllerConfig))
LIVE_KNOBS: frozenset[str] = ENGINE_KNOBS | CONTROLLER_KNOBS
assert not ENGINE_KNOBS & CONTROLLER_KNOBS, "a live knob's name must say which config it belongs to"


def with_live_knobs(config: EngineConfig, knobs: Mapping[str, Any]) -> EngineConfig:
    """`config` with `knobs` applied, validated as a whole (e.g. low <= high watermark); `config` is untouched.

    Raises FieldError naming an unknown knob, or the knob whose value is bad."""
    unknown = sorted(set(knobs) - LIVE_KNOBS)
    if unknown:
        raise FieldError(unknown[0], f"unknown live knob(s) {unknown}; allowed: {sorted(LIVE_KNOBS)}")
    data = config.model_dump()
    data.update({k: v for k, v in knobs.items() if k in ENGINE_KNOBS})
    data["controller"].update({k: v for k, v in knobs.items() if k in CONTROLLER_KNOBS})
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as e:
        raise FieldError(_blamed_knob(e, knobs), f"bad live knob(s): {_describe(e)}") from None


def _blamed_knob(error: ValidationError, knobs: Mapping[str, Any]) -> str:
    """The knob a validation error is about: the field it names, else (a cross-field check such as the
    watermarks' order) the knobs given, in order."""
    for err in error.errors():
        named = [str(p) for p in err["loc"] if str(p) in LIVE_KNOBS]
        if named:
            return named[-1]
    return ", ".join(sorted(knobs))


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        got = f" (got {err.get('input')!r})" if loc and loc[-1] in LIVE_KNOBS else ""  # not a whole config
        parts.append(f"{'.'.join(loc) or 'config'}: {err['msg']}{got}")
    return "; ".join(parts)
