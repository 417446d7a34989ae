"""The baseline of `benchmarks/http_load.py`: an LLM deployment written the way a Ray Serve user would by default.

A FastAPI-ingress deployment with POST /v1/completions whose handler awaits a `@serve.batch` method; the batch
method left-pads the prompts (with an attention mask) and calls `model.generate` once for the whole batch, as
in Ray's own batching examples (the call runs on the replica's user event loop and blocks it while it runs).
Greedy decoding. The batch generates max(max_tokens of its requests) new tokens with EOS suppressed
(`min_new_tokens = max_new_tokens`), and each request keeps its own first `max_tokens` of them: what
`@serve.batch` + `generate` gives a user when every request must get exactly its length.

Also: GET /health, and GET /info (torch threads seen inside the replica, the batch sizes it ran).

No `from __future__ import annotations` here: FastAPI must see the route parameters' real types.
"""

import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

DEFAULT_BATCH_WAIT_S = 0.1

app = FastAPI(title="plain @serve.batch + generate")


class PlainCompletionRequest(BaseModel):
    """The subset of OpenAI's completion request this baseline understands (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: list[int] | str = Field(description="Token ids, or text (tokenised without special tokens).")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="Ignored: decoding is always greedy.")
    ignore_eos: bool = Field(default=True, description="Ignored: EOS is always suppressed (exact lengths).")


@serve.deployment(name="PlainGenerate")
@serve.ingress(app)
class PlainGenerateServer:
    """One replica: one model, `model.generate` on batches formed by `@serve.batch`."""

    def __init__(self, model: str, dtype: str = "float32", threads: int = 2, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        from benchmarks.models import load

        torch.set_num_threads(threads)
        self.loaded = load(model, dtype=dtype, device="cpu")
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.model_name = model
        self.batch_sizes: list[int] = []
        # The decorator's values are the defaults; a benchmark may set others per deployment (Serve's setters;
        # mypy sees the undecorated method).
        self.generate_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "dtype": str(self.loaded.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "batch_sizes": self.batch_sizes}

    @app.post("/v1/completions")
    async def completions(self, body: PlainCompletionRequest) -> dict[str, Any]:
        result: dict[str, Any] = await self.generate_batch(body)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def generate_batch(self, bodies: list[PlainCompletionRequest]) -> list[dict[str, Any]]:
        prompts = [self._prompt_ids(b) for b in bodies]
        width = max(len(p) for p in prompts)
        steps = max(b.max_tokens for b in bodies)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends in the last column
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                                  min_new_tokens=steps, pad_token_id=self.pad_id)
        self.batch_sizes.append(len(bodies))
        created = int(time.time())
        results = []
        for row, (b, p) in enumerate(zip(bodies, prompts, strict=True)):
            tokens = out[row, width:width + b.max_tokens].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            results.append({
                "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "length" if len(tokens) == b.max_tokens else "stop"}],
                "usage": {"prompt_tokens": len(p), "completion_tokens": len(tokens),
                          "total_tokens": len(p) + len(tokens)},
            })
        return results

    def _prompt_ids(self, body: PlainCompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return list(self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        return list(body.prompt)
