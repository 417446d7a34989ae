"""Configuration of the Ray Serve layer (deployments/): the app builder's args, the live controller knobs
(`user_config`), and the replica autoscaling policy's knobs. Every knob is documented where it is declared.

The YAML edge (`serve_config.yaml`) is validated here with `extra="forbid"`: an unknown key or a bad value
fails `serve run` / `serve deploy` with a message that names it.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from configs.controller import ControllerConfig
from configs.engine import EngineConfig
from configs.live import live_fields

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def available_presets() -> list[str]:
    """Names of the presets shipped in configs/presets/ (file names without `.yaml`)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of an engine preset: a name from configs/presets/ or a path to a YAML file.

    A preset is an `EngineConfig` written in YAML; the caller validates it (after applying overrides).
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(
            f"preset {name_or_path!r} not found: use one of {available_presets()} or a path to a .yaml file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {name_or_path!r} ({path}) must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `overrides`, recursing into nested mappings (so `controller: {probe: x}` keeps the
    preset's other controller knobs)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ServerConfig(BaseModel):
    """The ingress: HTTP and handle front of the application (everything that is not the engine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="Model id clients send and /v1/models lists. Default: 'SmolLM2-135M-Instruct' for the "
        "default model, else the engine's `model` value. Requests may also name the engine's `model` value.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="When set, every /v1 request and /stats need 'Authorization: Bearer <key>' (else 401, "
        "checked from the headers before the body is read). Off by default. For Python callers of "
        "`make_app`; in serve_config.yaml use `api_key_file` or `api_key_env`, so the key is in no config "
        "file, dashboard or log.",
    )
    api_key_env: str | None = Field(
        default=None,
        min_length=1,
        description="Name of an environment variable that holds the API key, read when the replica starts. "
        "Export it in the shell that runs `ray start` / `serve run` (Ray's workers inherit it); never "
        "through runtime_env.env_vars, which Ray's runtime-env agent writes to its log (a replica that "
        "finds its key variable there refuses to start). An unset or empty variable fails the replica.",
    )
    api_key_file: str | None = Field(
        default=None,
        min_length=1,
        description="Path of a file holding the API key (surrounding whitespace is stripped), read when "
        "the replica starts; it must exist on every node that runs a replica. An unreadable or empty file "
        "fails the replica.",
    )
    default_max_tokens: int = Field(
        default=512,
        ge=1,
        description="Chat requests without max_tokens generate at most this many tokens (capped by the "
        "context left). Completions follow OpenAI's default of 16.",
    )
    metrics_interval_s: float = Field(
        default=1.0,
        gt=0.0,
        description="How often an engine replica copies its engine's gauges into Prometheus metrics.",
    )
    max_pending_requests: int | None = Field(
        default=24,
        ge=1,
        description="Requests one ingress replica accepts at once (running, waiting and prefilled); one more gets "
        "an OpenAI-shaped 429 with Retry-After at once, on HTTP and handles alike. A request with n choices "
        "(max(n, best_of)) counts as n; more than this is a 400 naming `n`. Keep it below the ingress's "
        "max_ongoing_requests, or Ray's proxy refuses first (with its own plain-text body). null turns it off.",
    )
    retry_after_s: int = Field(
        default=2, ge=1, description="The Retry-After (seconds) sent with the ingress's own 429 (over max_pending_requests)."
    )
    priority_min: int = Field(
        default=-1000, description="The most urgent `priority` a request may ask for; below it is a 400."
    )
    priority_max: int = Field(
        default=1000, description="The least urgent `priority` a request may ask for; above it is a 400."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest HTTP request body accepted; a larger Content-Length, or more bytes sent, gets "
        "an OpenAI-shaped 413 without reading the rest.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web origins allowed to call the API from a browser (CORS), e.g. "
        "['https://app.example.com'], or ['*'] for any. Empty (the default): no CORS headers, so browsers "
        "refuse cross-origin calls.",
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="The longest any request may run; a request's own `timeout` can only shorten it. When it "
        "passes, the request ends with finish_reason 'length' and a `warning`. null: no limit.",
    )
    failover_timeout_s: float = Field(
        default=120.0,
        gt=0.0,
        description="When the engine replica serving a request dies, the ingress continues the request on "
        "another (or on Serve's replacement) for up to this long; then the request fails with a 503 (an "
        "error event on an open stream). Also how long a request waits for the first engine replica.",
    )
    max_failovers: int = Field(
        default=3,
        ge=0,
        description="How many engine replicas may die under one request before it is given up with a 503: "
        "a request that kills every replica it reaches (a query of death) must not take the fleet down.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Time allowed to receive the whole HTTP request body after its headers; a slower "
        "client gets an OpenAI-shaped 408, so slow senders cannot hold the replica's request slots.",
    )

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        sources = [n for n in ("api_key", "api_key_env", "api_key_file") if getattr(self, n) is not None]
        if len(sources) > 1:
            raise ValueError(f"give at most one of api_key, api_key_env, api_key_file (got {sources})")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed_origins: {origin!r} is not '*' or a scheme://host[:port] origin")
        if self.priority_min > self.priority_max:
            raise ValueError(
                f"priority_min ({self.priority_min}) must not exceed priority_max ({self.priority_max})"
            )
        return self

    def resolved_api_key(self, runtime_env_vars: Mapping[str, str] = MappingProxyType({})) -> str | None:
        """The API key in force, or None when authentication is off. `runtime_env_vars` are the variables
        Ray's runtime_env set for this process: a key variable among them is refused (Ray logged it).
        Error messages never contain the key."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            if self.api_key_env in runtime_env_vars:
                raise ValueError(
                    f"server.api_key_env={self.api_key_env!r} is set through runtime_env.env_vars, which Ray "
                    "writes to its runtime-env agent log: export it where Ray starts instead, or use "
                    "server.api_key_file (and replace the key, which is now in that log)"
                )
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise ValueError(
                    f"server.api_key_env={self.api_key_env!r} but that variable is unset or empty"
                )
            return key
        if self.api_key_file is not None:
            try:
                key = Path(self.api_key_file).read_text().strip()
            except OSError as e:
                raise ValueError(
                    f"server.api_key_file={self.api_key_file!r} cannot be read: {e.strerror}"
                ) from None
            if not key:
                raise ValueError(f"server.api_key_file={self.api_key_file!r} is empty")
            return key
        return None

    def model_name_for(self, engine_model: str) -> str:
        if self.served_model_name is not None:
            return self.served_model_name
        return DEFAULT_MODEL_NAME if engine_model == "default" else engine_model


class LiveKnobs(BaseModel):
    """Base of `ControllerKnobs`: the knobs a `user_config` gives, applied live by `reconfigure()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def updates(self) -> dict[str, Any]:
        """The knobs that were given, as keyword arguments for `AsyncBatonEngine.update_controller`."""
        return self.model_dump(exclude_unset=True)


def _given_or_absent(field: FieldInfo) -> FieldInfo:
    """`field` with the same type, bounds and description, absent by default. The default (None) is never
    validated, so an omitted knob is simply not changed while an explicit null fails like any bad value."""
    return FieldInfo.merge_field_infos(field, default=None)


def _live_knob_fields() -> dict[str, Any]:
    """Every live knob's field definition (type, field info) for `create_model`."""
    return {
        name: (model.model_fields[name].annotation, _given_or_absent(model.model_fields[name]))
        for model in (EngineConfig, ControllerConfig)
        for name in live_fields(model)
    }


ControllerKnobs = create_model(
    "ControllerKnobs",
    __base__=LiveKnobs,
    __doc__="The deployment's `user_config`: every live knob (the fields marked `LIVE` in configs/engine.py "
    "and configs/controller.py), each optional. Only the knobs given change, without a restart; the engine "
    "validates the combination (e.g. low <= high watermark).",
    __module__=__name__,
    **_live_knob_fields(),
)


class BatonAppArgs(BaseModel):
    """The `args` of `deployments.builder:build_app` in serve_config.yaml.

    The engine config is the preset with `engine` overrides merged on top (nested mappings merge), then
    validated as an `EngineConfig`; a bad key or value fails the deploy naming it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field(
        default="cpu-default",
        min_length=1,
        description="Engine preset: a name in configs/presets/ or a .yaml path.",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="EngineConfig fields that override the preset's."
    )
    server: ServerConfig = Field(default_factory=ServerConfig)

    _engine_config: EngineConfig = PrivateAttr()

    @model_validator(mode="after")
    def _build_engine_config(self) -> BatonAppArgs:
        merged = _deep_merge(load_preset(self.preset), self.engine)
        try:
            self._engine_config = EngineConfig.model_validate(merged)
        except ValidationError as e:
            problems = "; ".join(
                f"engine.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                for err in e.errors()
            )
            raise ValueError(
                f"invalid engine config (preset {self.preset!r} + overrides): {problems}"
            ) from None
        return self

    @property
    def engine_config(self) -> EngineConfig:
        return self._engine_config


class ReplicaPolicyConfig(BaseModel):
    """Knobs of the BATON replica autoscaling policy (autoscaler/serve_policy.py), given as
    `autoscaling_config.policy.policy_kwargs`. Delays, bounds and scaling factors stay Ray's own
    (`upscale_delay_s`, `downscale_delay_s`, `min_replicas`, `max_replicas`, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_utilisation: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Scale up when demand (running + waiting + swapped + queued at handles) exceeds this "
        "fraction of the replicas' rows (max_batch_size each).",
    )
    downscale_utilisation: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Scale down only to a count whose rows the demand fills at most this much (hysteresis; "
        "must not exceed target_utilisation).",
    )
    memory_pressure: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="A replica whose memory_used_fraction reaches this while work waits counts as saturated.",
    )
    preemptions_per_s: float = Field(
        default=0.5,
        gt=0.0,
        description="A mean preemption rate per replica at or above this asks for one more replica.",
    )
    ttft_slo_s: float | None = Field(
        default=None,
        gt=0.0,
        description="When set, a replica's mean time to first token above this asks for one more.",
    )

    @model_validator(mode="after")
    def _check(self) -> ReplicaPolicyConfig:
        if self.downscale_utilisation > self.target_utilisation:
            raise ValueError(
                f"downscale_utilisation ({self.downscale_utilisation}) must not exceed "
                f"target_utilisation ({self.target_utilisation})"
            )
        return self
