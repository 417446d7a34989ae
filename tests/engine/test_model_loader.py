"""load_model: user mistakes become one clear ValueError; a local model directory loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import model_loader
from engine.model_loader import load_model, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory):
    """The tiny Llama and its tokenizer saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.model.save_pretrained(path)
    tiny_model.tokenizer.save_pretrained(path)
    return path


def test_missing_model_directory(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"not found.*no such directory"):
        load_model(str(missing), device="cpu")
    with pytest.raises(ValueError, match="not found"):
        load_model("./relative/missing-model", device="cpu")


def test_missing_gguf_file(tmp_path) -> None:
    path = tmp_path / "model-q8.gguf"
    with pytest.raises(ValueError, match=r"model file .*model-q8\.gguf.* does not exist"):
        load_model(str(path), device="cpu")


def test_a_file_that_is_not_a_gguf(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"is a file but not a \.gguf"):
        load_model(str(path), device="cpu")


def test_a_directory_without_a_model(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"could not load model"):
        load_model(str(tmp_path), device="cpu")


def test_unknown_dtype(tiny_dir) -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'"):
        load_model(str(tiny_dir), dtype="int8", device="cpu")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_auto_dtype_follows_the_cpu_flags(tmp_path, monkeypatch) -> None:
    def cpuinfo(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\nbogomips\t: 4000\n" * 2)
        return path

    assert model_loader.cpu_has_native_bf16(cpuinfo("avx2 avx512f avx512_bf16"))
    assert model_loader.cpu_has_native_bf16(cpuinfo("avx2 amx_tile amx_bf16"))
    assert not model_loader.cpu_has_native_bf16(cpuinfo("avx2 avx512f avx512_vnni"))
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model_loader, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype("auto", torch.device("cpu")) == want
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # only auto looks at the CPU
    if torch.cuda.is_available():
        assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize(("device", "match"), [("tpu", "unknown device 'tpu'"), ("gpu:0", "unknown device 'gpu:0'"),
                                               ("meta", "unsupported device 'meta'")])
def test_unknown_device(tiny_dir, device: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_model(str(tiny_dir), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_when_unavailable(tiny_dir) -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{device}' requested but CUDA is not available"):
            load_model(str(tiny_dir), device=device)
    assert resolve_device("auto") == torch.device("cpu")


def test_encoder_decoder_model_is_rejected(tiny_model, tmp_path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(T5Config\) is not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_encoder_only_model_is_rejected(tiny_model, tmp_path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(BertConfig\) is not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_local_directory_loads(tiny_model, tiny_dir) -> None:
    loaded = load_model(str(tiny_dir), dtype="float64", device="cpu")
    assert loaded.dtype == torch.float64 and loaded.device == torch.device("cpu")
    assert loaded.name == str(tiny_dir)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float64
    ids = torch.tensor([[5, 600, 7000, 42]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_model.model(ids).logits)
    assert loaded.tokenizer.encode("Hello world") == tiny_model.tokenizer.encode("Hello world")
    as32 = load_model(str(tiny_dir), dtype="float32", device="cpu")
    assert next(as32.model.parameters()).dtype == torch.float32


def test_local_directory_serves_requests(tiny_dir) -> None:
    from configs import EngineConfig
    from engine import BatonEngine, SamplingParams
    from tests.helpers import run_to_completion

    engine = BatonEngine(EngineConfig(model=str(tiny_dir), dtype="float64", device="cpu"))
    engine.add_request("r", prompt="Hello", sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    outs = run_to_completion(engine)["r"]
    assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 3
