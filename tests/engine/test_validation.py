"""Bad requests raise FieldError (a ValueError) naming the field in `.param` and quoting the bad value, and
leave the engine untouched; so do bad live knobs."""

from __future__ import annotations

import pytest

from configs.errors import FieldError
from configs.knobs import LIVE_KNOBS
from engine.request import SamplingParams
from tests.helpers import make_engine, run_to_completion

MAX_LEN = 64


@pytest.fixture
def engine(tiny_model):
    return make_engine(tiny_model, max_model_len=MAX_LEN)


def rejects(engine, match: str, param: str = "prompt", **kwargs) -> None:
    kwargs.setdefault("request_id", "r")
    with pytest.raises(FieldError, match=match) as e:
        engine.add_request(**kwargs)
    assert e.value.param == param
    assert not engine.has_unfinished_requests(), "a rejected request must not be queued"


def test_prompt_fields(engine) -> None:
    rejects(engine, r"prompt must be a non-empty string, got ''", prompt="")
    rejects(engine, r"prompt must be a non-empty string, got 123", prompt=123)
    rejects(engine, r"prompt_token_ids must not be empty", "prompt_token_ids", prompt_token_ids=[])
    rejects(engine, r"exactly one of prompt or prompt_token_ids", prompt="hi", prompt_token_ids=[1, 2])
    rejects(engine, r"exactly one of prompt or prompt_token_ids")


def test_context_length(engine) -> None:
    rejects(engine, r"max_tokens \(60\).*context length \(64\)", prompt_token_ids=[5] * 5,
            sampling_params=SamplingParams(max_tokens=60))
    rejects(engine, r"prompt \(65 tokens\).*64", prompt_token_ids=[5] * 65,
            sampling_params=SamplingParams(max_tokens=1))
    engine.add_request("fits", prompt_token_ids=[5] * 4, sampling_params=SamplingParams(max_tokens=60))
    assert engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, r"max_tokens.*got 0"),
        ({"max_tokens": -3}, r"max_tokens.*got -3"),
        ({"max_tokens": 2.5}, r"max_tokens.*got 2\.5"),
        ({"temperature": -0.5}, r"temperature.*got -0\.5"),
        ({"top_p": 0.0}, r"top_p.*got 0\.0"),
        ({"top_p": 1.5}, r"top_p.*got 1\.5"),
        ({"top_k": -1}, r"top_k.*got -1"),
        ({"seed": "abc"}, r"seed.*'abc'"),
        ({"stop": ["ok", ""]}, r"stop strings.*''"),
        ({"stop_token_ids": [-1]}, r"stop_token_ids.*got -1"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\], got 2\.5"),
        ({"presence_penalty": float("nan")}, r"presence_penalty.*got nan"),
        ({"frequency_penalty": -2.01}, r"frequency_penalty.*got -2\.01"),
        ({"frequency_penalty": True}, r"frequency_penalty.*got True"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0, got 0\.0"),
        ({"repetition_penalty": -1.2}, r"repetition_penalty.*got -1\.2"),
        ({"repetition_penalty": float("inf")}, r"repetition_penalty.*got inf"),
        ({"logit_bias": {5: 101}}, r"logit_bias values must be numbers in \[-100, 100\], got 101 for token 5"),
        ({"logit_bias": {5: float("nan")}}, r"logit_bias values.*got nan"),
        ({"logit_bias": {-1: 1.0}}, r"logit_bias keys must be token ids.*got -1"),
        ({"logit_bias": {"5": 1.0}}, r"logit_bias keys must be token ids.*got '5'"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, r"logit_bias takes at most 300 entries, got 301"),
        ({"logit_bias": [(5, 1.0), (5, 2.0)]}, r"logit_bias names token 5 twice"),
        ({"logit_bias": 5}, r"logit_bias must map token ids to biases, got 5"),
        ({"min_tokens": -1}, r"min_tokens must be an integer in \[0, max_tokens=16\], got -1"),
        ({"min_tokens": 17}, r"min_tokens.*max_tokens=16.*got 17"),
        ({"min_tokens": 1.5}, r"min_tokens.*got 1\.5"),
    ],
)
def test_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(FieldError, match=match) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs))  # the field, not text to parse


def test_token_ids_outside_the_vocabulary(engine) -> None:
    v = engine.vocab_size
    ids = "prompt_token_ids"
    rejects(engine, r"prompt_token_ids \[-1\] outside the vocabulary", ids, prompt_token_ids=[3, -1, 4])
    rejects(engine, rf"prompt_token_ids \[{v}\] outside the vocabulary \[0, {v}\)", ids, prompt_token_ids=[3, v])
    rejects(engine, r"prompt_token_ids \[1\.5\]", ids, prompt_token_ids=[3, 1.5])
    rejects(engine, rf"stop_token_ids \[{v + 7}\] outside the vocabulary \(size {v}\)", "stop_token_ids",
            prompt_token_ids=[3], sampling_params=SamplingParams(stop_token_ids=[2, v + 7]))
    rejects(engine, rf"logit_bias token ids \[{v}\] outside the vocabulary \[0, {v}\)", "logit_bias",
            prompt_token_ids=[3], sampling_params=SamplingParams(logit_bias={v - 1: 5.0, v: -5.0}))


def test_logit_adjustments_at_their_limits_are_accepted() -> None:
    p = SamplingParams(max_tokens=4, presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=1e-3,
                       logit_bias={i: (-100 if i % 2 else 100) for i in range(300)}, min_tokens=4)
    assert len(p.logit_bias) == 300 and p.logit_bias[:2] == ((0, 100.0), (1, -100.0))
    assert SamplingParams(logit_bias={7: 1, 3: -2.5}).logit_bias == ((3, -2.5), (7, 1.0))  # sorted, floats
    assert hash(p) == hash(SamplingParams(**{k: getattr(p, k) for k in p.__dataclass_fields__}))


def test_request_id_and_priority(engine) -> None:
    rejects(engine, r"request_id must be a non-empty string", "request_id", request_id="", prompt="hi")
    rejects(engine, r"priority must be an integer, got 1\.5", "priority", prompt="hi", priority=1.5)
    rejects(engine, r"priority must be an integer, got '2'", "priority", prompt="hi", priority="2")
    rejects(engine, r"priority must be an integer, got True", "priority", prompt="hi", priority=True)
    rejects(engine, r"sampling_params must be a SamplingParams", "sampling_params", prompt="hi",
            sampling_params={"max_tokens": 2})


def test_duplicate_request_id_only_while_running(engine) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("dup", prompt_token_ids=[5, 6], sampling_params=params)
    with pytest.raises(ValueError, match=r"duplicate request id 'dup'"):
        engine.add_request("dup", prompt_token_ids=[7], sampling_params=params)
    engine.step()  # running now (prefilled and in the batch)
    with pytest.raises(ValueError, match=r"duplicate request id 'dup'"):
        engine.add_request("dup", prompt_token_ids=[7], sampling_params=params)
    first = run_to_completion(engine)["dup"]
    assert first[-1].finished and sum(len(o.new_token_ids) for o in first) <= 3
    engine.add_request("dup", prompt_token_ids=[7], sampling_params=params)  # finished: the id is free again
    outs = run_to_completion(engine)["dup"]
    assert outs[-1].finished and outs[-1].usage.prompt_tokens == 1


def test_prefill_pool_size_zero_is_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match="prefill_pool_size"):
        make_engine(tiny_model, policy="baton-pd", prefill_pool_size=0)


@pytest.mark.parametrize(
    ("knobs", "param", "match"),
    [
        ({"max_batch_sise": 3}, "max_batch_sise", "unknown live knob"),
        ({"max_batch_size": 0}, "max_batch_size", "max_batch_size: Input should be greater than or equal to 1"),
        ({"min_priority_gap": -1}, "min_priority_gap", r"controller\.min_priority_gap"),
        ({"preemption_mode": "teleport"}, "preemption_mode", "teleport"),
        ({"low_watermark": 0.95}, "low_watermark", "must not exceed high_watermark"),  # a cross-field check
    ],
)
def test_bad_live_knobs_name_the_knob(engine, knobs: dict, param: str, match: str) -> None:
    before = engine.config
    with pytest.raises(FieldError, match=match) as e:
        engine.validate_knobs(knobs)
    assert e.value.param == param
    with pytest.raises(FieldError):
        engine.reconfigure(**knobs)
    assert engine.config is before  # a rejected change leaves the config in force


def test_every_live_knob_is_accepted_by_the_engine(engine) -> None:
    """The list of live knobs is derived from the config fields' marker: the ten the engine applies live."""
    assert LIVE_KNOBS == {
        "max_batch_size", "prefill_token_budget", "prefill_pool_size", "high_watermark", "low_watermark",
        "preemption_mode", "min_priority_gap", "max_preemptions_per_request", "memory_budget_bytes",
        "host_swap_budget_bytes",
    }
    values = {"max_batch_size": 3, "prefill_token_budget": 64, "prefill_pool_size": 2, "high_watermark": 0.8,
              "low_watermark": 0.5, "preemption_mode": "swap", "min_priority_gap": 2,
              "max_preemptions_per_request": 5, "memory_budget_bytes": 1 << 30, "host_swap_budget_bytes": 1 << 20}
    engine.reconfigure(**values)
    cfg = engine.config
    applied = {k: getattr(cfg, k) if hasattr(cfg, k) else getattr(cfg.controller, k) for k in values}
    assert applied == values
