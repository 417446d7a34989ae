"""Configuration of the capacity controller (autoscaler/). Every knob is documented where it is declared."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.live import LIVE

ProbeName = Literal["auto", "nvml", "torch", "host", "simulated", "fixed"]
PreemptionMode = Literal["swap", "recompute", "auto"]


class PressureEvent(BaseModel):
    """One step of a scripted external-memory trace for the simulated probe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iteration: int = Field(ge=0, description="Engine iteration at which the pressure takes effect.")
    fraction: float = Field(
        ge=0.0, le=1.0, description="Fraction of the device budget another tenant holds from then on."
    )


class ControllerConfig(BaseModel):
    """How the engine decides its batch capacity every iteration.

    `probe="fixed"` is the plain fixed-capacity controller: `max_batch_size` rows, no memory readings, no
    preemption. Every other probe drives the memory-aware controller.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    probe: ProbeName = Field(
        default="fixed",
        description="Memory probe: fixed (no probe, fixed capacity), nvml, torch, host, simulated, or auto "
        "(nvml, then torch, then host).",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        json_schema_extra=LIVE,
        gt=0,
        description="Device budget in bytes. Required for the simulated probe; for host the cgroup limit is "
        "used when this is unset; for nvml/torch it caps the device total.",
    )
    host_swap_budget_bytes: int = Field(
        default=2 << 30,
        json_schema_extra=LIVE,
        ge=0,
        description="Host memory that swapped-out KV may hold; beyond it, preempt by recompute.",
    )
    high_watermark: float = Field(
        default=0.90,
        json_schema_extra=LIVE,
        gt=0.0,
        le=1.0,
        description="Predicted peak (fraction of budget) the next step must stay under.",
    )
    low_watermark: float = Field(
        default=0.75,
        json_schema_extra=LIVE,
        gt=0.0,
        le=1.0,
        description="Capacity grows only while the predicted peak is under this fraction.",
    )
    preemption_mode: PreemptionMode = Field(
        default="auto",
        json_schema_extra=LIVE,
        description="swap (KV to host), recompute (drop KV, prefill again), auto (swap while host room).",
    )
    min_priority_gap: int = Field(
        default=1,
        json_schema_extra=LIVE,
        ge=0,
        description="A waiting request displaces a running one only if more urgent by at least this.",
    )
    max_preemptions_per_request: int = Field(
        default=3,
        json_schema_extra=LIVE,
        ge=0,
        description="After this many preemptions a request is never preempted again (no starvation).",
    )
    growth_lookahead_steps: int = Field(
        default=256,
        ge=1,
        description="Capacity grows only if that many rows fit under high_watermark when each is as wide as "
        "the widest row gets within this many steps (rows grow until max_tokens; see memory_controller).",
    )
    pressure_trace: tuple[PressureEvent, ...] = Field(
        default=(), description="Simulated probe only: scripted external pressure, by iteration."
    )

    def updated(self, **changes: object) -> ControllerConfig:
        """A validated copy with `changes` applied; `self` is untouched.

        Use this for live changes rather than assigning fields: pydantic keeps an assigned value even when
        the cross-field check then fails, and moving both watermarks one at a time can pass through an
        invalid pair.
        """
        return type(self).model_validate({**self.model_dump(), **changes})

    @model_validator(mode="after")
    def _check(self) -> ControllerConfig:
        if self.low_watermark > self.high_watermark:
            raise ValueError(
                f"low_watermark ({self.low_watermark}) must not exceed high_watermark ({self.high_watermark})"
            )
        if self.probe == "simulated" and self.memory_budget_bytes is None:
            raise ValueError("probe='simulated' needs memory_budget_bytes")
        return self
