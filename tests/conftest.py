"""Shared fixtures: the default model is loaded once per test run; a tiny random Llama for fast tests; the
session's Ray + Serve instance (started only by the tests that ask for it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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

    with serve_instance(num_cpus=4, log_to_driver=bool(os.environ.get("BATON_TEST_RAY_LOGS")),
                        _metrics_export_port=metrics_port) as url:
        yield url
