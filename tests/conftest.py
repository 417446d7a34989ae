"""Shared fixtures: the default model is loaded once per test run; a tiny random Llama for fast tests; the
session's Ray + Serve instance (started only by the tests that ask for it)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_gpu() -> bool:
    return torch.cuda.is_available()


# Under pytest-xdist (scripts/test.sh runs two workers): one torch thread per worker, since two 2-thread OpenMP
# pools on 2 cores collapse. Ray replicas are other processes and keep the threads their num_cpus gives them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SERIAL_GROUP = "serial"
# What a module's source names when it uses Ray/Serve (the session's instance, or the `ray`/`serve` CLIs' own
# clusters) or measures timing (`pytest.mark.serial`).
_SERIAL_WORDS = ("ray_serve", "serve_instance", "ray_cluster", "mark.serial")
# What a module's source names when it starts a Ray cluster of its own (its own temp dir and ports; nothing of it is
# found by the session's `ray.init(address="local")`): it may run on the other worker, beside the serial ones.
_BESIDE = "mark.beside_serial"


@functools.cache
def runs_serially(module: str) -> bool:
    """Whether the tests of `module` (a path relative to the repository) share one xdist worker, one after
    another as without xdist: they start or use Ray/Serve, or measure timing."""
    path = REPO / module
    if not path.is_file():
        return False
    text = path.read_text()
    return _BESIDE not in text and any(word in text for word in _SERIAL_WORDS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scheduling by scope, where a scope is a module (its module-scoped fixtures, e.g. solo references,
    are built once) or, for every module that `runs_serially`, the one serial scope: the largest, so it starts
    first on one worker while the other takes the remaining modules. (Scopes from the module path, not from
    `xdist_group` marks: `--dist loadgroup` loses them with pytest 9.2, pytest-xdist issue #1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrSerial(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SERIAL_GROUP if runs_serially(module) else module

    return ModuleOrSerial(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # a module that uses Ray without naming it would start a second Ray on the other worker
        uses_ray = "ray_serve" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray_cluster")
        module = item.nodeid.split("::", 1)[0]
        if uses_ray and not runs_serially(module) and not item.get_closest_marker("beside_serial"):
            raise pytest.UsageError(f"{module} uses Ray/Serve without naming one of {_SERIAL_WORDS}")
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct (float32, CPU) as a `LoadedModel`, loaded once."""
    from engine.model_loader import load_model

    return load_model("default", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def default_model_bf16():
    """The default model in bfloat16 (what `dtype: auto` picks on a CPU with native bf16), loaded once."""
    from engine.model_loader import load_model

    return load_model("default", dtype="bfloat16", device="cpu")


def _tiny_llama(tok, vocab_size: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model_loader import LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return LoadedModel(model=model, tokenizer=tok, dtype=torch.float64, device=torch.device("cpu"), name="tiny")


@pytest.fixture(scope="session")
def tiny_model(default_model):
    """A tiny randomly initialised Llama in float64 with the default model's tokenizer (fast, exact maths)."""
    return _tiny_llama(default_model.tokenizer, None)


@pytest.fixture(scope="session")
def tiny_small_vocab_model(default_model):
    """Like `tiny_model` but with a 1024-token vocabulary (token-id prompts only): the LM head no longer
    dominates, so workloads with hundreds of requests run in seconds."""
    return _tiny_llama(default_model.tokenizer, 1024)


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where this session's Ray exports Prometheus metrics."""
    from tests.deployments.serve_testing import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_serve(metrics_port: int) -> Iterator[str]:
    """One local Ray instance (CPU only, no dashboard) with Serve on a free loopback port, for the whole
    session: starting Ray costs ~15 s on 2 cores, so the modules (tests/deployments, tests/benchmarks) share
    it. Yields the HTTP base URL. Ray workers get the repository root on PYTHONPATH so classes and factories
    from tests/ and benchmarks/ (e.g. the fake front `tests.deployments.fake_engine.FakeAsyncEngine`) can be
    unpickled on the replicas."""
    from benchmarks.serve_local import serve_instance

    # Serve kills a proxy that is not ready within 3 checks of 5 s, and serve.start() then fails: on 2 cores busy
    # with the other worker (test_two_nodes starts a 2-node cluster at the same time), a proxy once took longer.
    slow_start = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
    with serve_instance(num_cpus=4, log_to_driver=bool(os.environ.get("BATON_TEST_RAY_LOGS")), env=slow_start,
                        _metrics_export_port=metrics_port) as url:
        yield url
