"""A small demo: the BATON engine answers a few chat prompts with the default model, streaming as it goes.

    python -m engine.demo [--policy baton-pd] [--max-tokens 64] [--model default]
"""

from __future__ import annotations

import argparse
import time

from configs import EngineConfig
from engine import BatonEngine, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a neural network is.",
    "Give me three tips for learning to cook.",
    "What is 12 times 12?",
    "Name a famous painting and its painter.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--policy", default="baton-pd", choices=["static", "orca", "baton", "baton-pd"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=4)
    args = ap.parse_args()

    print(f"loading {args.model!r} ...", flush=True)
    engine = BatonEngine(EngineConfig(model=args.model, policy=args.policy, max_batch_size=args.max_batch_size))
    tok = engine.tokenizer
    for i, question in enumerate(PROMPTS):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        engine.add_request(f"q{i}", prompt=prompt, sampling_params=SamplingParams(max_tokens=args.max_tokens))
    answers = {f"q{i}": "" for i in range(len(PROMPTS))}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            answers[out.request_id] += out.text
            if out.finished:
                i = int(out.request_id[1:])
                print(f"\n[{out.request_id}] {PROMPTS[i]}\n  -> {answers[out.request_id].strip()}"
                      f"\n  ({out.finish_reason}, {out.usage.completion_tokens if out.usage else 0} tokens, "
                      f"at iteration {engine.iteration})", flush=True)
    s = engine.stats
    print(f"\n{len(PROMPTS)} answers in {time.perf_counter() - t0:.1f} s; policy {args.policy}; "
          f"{s.generated_tokens} tokens; idle computation {s.idle_fraction:.1%}; "
          f"time outside forward passes {s.outside_forward_fraction:.1%}")


if __name__ == "__main__":
    main()
