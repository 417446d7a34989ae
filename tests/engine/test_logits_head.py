"""The CPU LM-head fast path: enabled only where it equals the model's own forward, and exact in the engine."""

from __future__ import annotations

import copy

import torch

from engine.logits_head import FastLogitsHead
from tests.helpers import make_engine, mismatches, random_workload, run_workload, solo_greedy


def test_probe_accepts_llama_on_cpu_and_matches_the_model(default_model, tiny_model) -> None:
    for loaded in (default_model, tiny_model):
        head = FastLogitsHead.probe(loaded.model, loaded.device)
        assert head is not None and head.weight is loaded.model.lm_head.weight
        hidden = torch.randn(5, loaded.model.config.hidden_size, dtype=loaded.dtype)
        want = loaded.model.lm_head(hidden)
        assert torch.allclose(head.logits(hidden), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(head.logits(hidden[:1]), loaded.model.lm_head(hidden[:1]))  # 1 row: the same call


def test_probe_refuses_models_whose_logits_are_not_a_plain_head(tiny_model) -> None:
    model = tiny_model.model
    cpu = torch.device("cpu")
    assert FastLogitsHead.probe(model, torch.device("cuda")) is None  # only a CPU workaround

    class ScaledLogits(type(model)):  # type: ignore[misc]
        """Like Cohere's logit_scale or Gemma's soft-capping: the forward changes the head's output."""

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    scaled = copy.deepcopy(model)
    scaled.__class__ = ScaledLogits
    assert FastLogitsHead.probe(scaled, cpu) is None

    biased = copy.deepcopy(model)
    biased.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=True, dtype=torch.float64)
    assert FastLogitsHead.probe(biased, cpu) is None


def test_engine_uses_it_and_stays_token_identical_to_solo_generate(tiny_model) -> None:
    work = random_workload(seed=3, n=12, vocab=tiny_model.model.config.vocab_size, prompt_len=(1, 40),
                           max_tokens=(1, 20), arrival_span=10)
    reference = {w["id"]: solo_greedy(tiny_model.model, w["prompt"], w["max_tokens"]) for w in work}
    for fast in (True, False):
        engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=6, fast_lm_head=fast)
        assert (engine.runner.fast_head is not None) == fast
        assert mismatches(run_workload(engine, work), reference) == []
