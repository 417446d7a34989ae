"""The YAML / Serve edge without Ray running: app builder args, presets, user_config knobs, policy kwargs,
and serve_config.yaml itself (checked against Ray's schema and ours)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from configs import ControllerConfig, EngineConfig
from configs.knobs import LIVE_KNOBS
from configs.serve import (
    BatonAppArgs,
    ControllerKnobs,
    ReplicaPolicyConfig,
    ServerConfig,
    available_presets,
    load_preset,
)
from deployments.builder import build_app

REPO = Path(__file__).resolve().parents[2]


def test_presets_are_valid_engine_configs() -> None:
    assert {"cpu-default", "gpu"} <= set(available_presets())
    for name in available_presets():
        EngineConfig.model_validate(load_preset(name))
    cpu = BatonAppArgs().engine_config
    assert (cpu.model, cpu.device, cpu.dtype) == ("default", "cpu", "auto")


def test_engine_overrides_merge_into_the_preset() -> None:
    args = BatonAppArgs(engine={"max_batch_size": 3, "controller": {"low_watermark": 0.5}})
    cfg = args.engine_config
    assert cfg.max_batch_size == 3
    assert cfg.controller.low_watermark == 0.5
    assert cfg.controller.probe == load_preset("cpu-default")["controller"]["probe"]  # kept from the preset


def test_preset_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model: some/model\nmax_batch_size: 2\n")
    assert BatonAppArgs(preset=str(path)).engine_config.model == "some/model"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"presett": "cpu-default"}, "presett"),
        ({"preset": "nope"}, "preset 'nope' not found"),
        ({"engine": {"max_batch_sise": 4}}, "engine.max_batch_sise"),
        ({"engine": {"max_batch_size": 0}}, "engine.max_batch_size"),
        ({"engine": {"controller": {"probe": "psychic"}}}, "engine.controller.probe"),
        ({"engine": {"controller": {"low_watermark": 0.95}}}, "low_watermark"),
        ({"server": {"api_kee": "x"}}, "server.api_kee"),
        ({"server": {"default_max_tokens": -1}}, "server.default_max_tokens"),
    ],
)
def test_bad_args_fail_the_build_naming_the_field(args: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        build_app(args)
    assert words in str(e.value)


def test_build_app_returns_an_application() -> None:
    assert isinstance(build_app({"engine": {"max_batch_size": 2}}), Application)


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"max_rows": 3}, "max_rows"),
        ({"high_watermark": 1.5}, "high_watermark"),
        ({"low_watermark": 0}, "low_watermark"),
        ({"preemption_mode": "teleport"}, "preemption_mode"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"prefill_token_budget": "lots"}, "prefill_token_budget"),
    ],
)
def test_bad_controller_knobs(knobs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        ControllerKnobs.model_validate(knobs)


def test_controller_knobs_pass_only_what_was_given() -> None:
    assert ControllerKnobs(high_watermark=0.8).updates() == {"high_watermark": 0.8}
    assert ControllerKnobs().updates() == {}
    assert ControllerKnobs(memory_budget_bytes=None).updates() == {"memory_budget_bytes": None}  # unset it
    with pytest.raises(ValidationError, match="high_watermark"):  # null is not "leave it": it is a bad value
        ControllerKnobs.model_validate({"high_watermark": None})


def test_user_config_covers_every_live_knob() -> None:
    """The user_config schema is derived from the config fields marked live, not a hand-kept copy."""
    assert set(ControllerKnobs.model_fields) == LIVE_KNOBS and len(LIVE_KNOBS) == 10
    assert ControllerKnobs.model_fields["min_priority_gap"].description == (
        ControllerConfig.model_fields["min_priority_gap"].description
    )
    for knobs in ({"min_priority_gap": -1}, {"max_preemptions_per_request": "many"},
                  {"prefill_pool_size": 0}, {"host_swap_budget_bytes": -5}):
        with pytest.raises(ValidationError, match=next(iter(knobs))):
            ControllerKnobs.model_validate(knobs)


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerConfig().resolved_api_key() is None
    assert ServerConfig(api_key="k").resolved_api_key() == "k"  # type: ignore[arg-type]
    monkeypatch.setenv("BATON_TEST_KEY", "from-env")
    assert ServerConfig(api_key_env="BATON_TEST_KEY").resolved_api_key() == "from-env"
    monkeypatch.delenv("BATON_TEST_KEY")
    with pytest.raises(ValueError, match="BATON_TEST_KEY"):
        ServerConfig(api_key_env="BATON_TEST_KEY").resolved_api_key()
    assert "s3cret" not in repr(ServerConfig(api_key="s3cret"))  # type: ignore[arg-type]  # never in logs


def test_api_key_from_a_file_and_never_from_runtime_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key comes from a file or an inherited variable read at start; a key variable that Ray's
    runtime_env set (and so wrote to the runtime-env agent's log) is refused, and no message shows the key."""
    key_file = tmp_path / "key"
    key_file.write_text("file-s3cret\n")
    assert ServerConfig(api_key_file=str(key_file)).resolved_api_key() == "file-s3cret"
    key_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        ServerConfig(api_key_file=str(key_file)).resolved_api_key()
    with pytest.raises(ValueError, match="cannot be read"):
        ServerConfig(api_key_file=str(tmp_path / "missing")).resolved_api_key()
    monkeypatch.setenv("BATON_TEST_KEY", "env-s3cret")
    with pytest.raises(ValueError, match="runtime_env") as e:
        ServerConfig(api_key_env="BATON_TEST_KEY").resolved_api_key({"BATON_TEST_KEY": "env-s3cret"})
    assert "env-s3cret" not in str(e.value)
    with pytest.raises(ValidationError, match="at most one"):
        ServerConfig(api_key_env="BATON_TEST_KEY", api_key_file=str(key_file))


def test_served_model_name() -> None:
    assert ServerConfig().model_name_for("default") == "SmolLM2-135M-Instruct"
    assert ServerConfig().model_name_for("org/model") == "org/model"
    assert ServerConfig(served_model_name="m").model_name_for("default") == "m"


def test_serve_config_yaml_is_valid_for_ray_and_for_us() -> None:
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert len(schema.applications) == 1
    app = schema.applications[0]
    assert app.import_path == "deployments.builder:build_app"
    args = BatonAppArgs.model_validate(app.args)
    assert args.engine_config.model == "default" and args.engine_config.device == "cpu"
    assert [d.name for d in app.deployments] == ["BatonIngress", "BatonEngine"]
    ingress, deployment = app.deployments
    assert ingress.ray_actor_options.num_cpus == 0  # the ingress takes no CPU from the engines
    assert isinstance(deployment.user_config, dict)
    assert set(ControllerKnobs.model_validate(deployment.user_config).updates()) == {
        "high_watermark",
        "low_watermark",
        "preemption_mode",
        "max_batch_size",
        "prefill_token_budget",
    }
    autoscaling: Any = deployment.autoscaling_config
    assert autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    policy = autoscaling["policy"]
    assert policy["policy_function"] == "autoscaler.serve_policy:BatonReplicaPolicy"
    ReplicaPolicyConfig.model_validate(policy["policy_kwargs"])
    assert deployment.max_ongoing_requests >= args.server.max_pending_requests  # the engine queues them all
    assert_refusals_are_the_ingress(args.server, ingress)
    assert raw["http_options"]["host"] == "127.0.0.1"


def assert_refusals_are_the_ingress(server: ServerConfig, deployment: Any) -> None:
    """The ingress's own limit binds before Ray's: Ray's proxy never refuses (its refusal is plain text),
    and slots stay free above max_pending_requests for the ingress's 429s and /health."""
    assert deployment.max_queued_requests == -1
    assert server.max_pending_requests is not None
    assert server.max_pending_requests + 4 <= deployment.max_ongoing_requests


def test_gpu_serve_config_is_valid_for_ray_and_for_us() -> None:
    raw = yaml.safe_load((REPO / "configs" / "serve_gpu.yaml").read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    args = BatonAppArgs.model_validate(app.args)
    cfg = args.engine_config
    assert (cfg.device, cfg.dtype, cfg.controller.probe) == ("cuda", "bfloat16", "nvml")
    ingress, deployment = app.deployments
    assert (ingress.name, deployment.name) == ("BatonIngress", "BatonEngine")
    assert deployment.ray_actor_options.num_gpus == 1
    ControllerKnobs.model_validate(deployment.user_config)
    assert deployment.max_ongoing_requests >= args.server.max_pending_requests  # type: ignore[operator]
    assert_refusals_are_the_ingress(args.server, ingress)
    assert args.server.max_pending_requests >= cfg.max_batch_size  # type: ignore[operator]
