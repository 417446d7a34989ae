"""A request resumed after tokens it already streamed (`resume_token_ids`: its replica died mid-stream and the
ingress continues it on another) gives exactly the rest of an undisturbed run: the same tokens, the same
text deltas, the same usage, greedy and seeded, with stop strings held across the cut."""

from __future__ import annotations

import pytest

from configs.errors import FieldError
from engine.request import SamplingParams
from tests.helpers import make_engine, run_to_completion


def _run(engine, rid, prompt, params, resume=()):
    engine.enqueue(engine.make_request(rid, prompt_token_ids=prompt, sampling_params=params,
                                       resume_token_ids=resume))
    return run_to_completion(engine)[rid]


def _per_token_text(outs):
    """(token ids, the text streamed once each token had arrived), and the final output."""
    tokens, texts = [], []
    for o in outs:
        for i, t in enumerate(o.new_token_ids):
            tokens.append(t)
            texts.append(o.text if i == len(o.new_token_ids) - 1 else "")
    return tokens, texts, outs[-1]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, ignore_eos=True),  # unseeded: the seed derives from the id
    # Penalties count the resumed tokens as output; min_tokens holds EOS (+100) off across the cuts.
    SamplingParams(max_tokens=24, temperature=0.9, seed=3, presence_penalty=0.8, frequency_penalty=0.5,
                   repetition_penalty=1.3, logit_bias={2: 100.0}, min_tokens=24),
])
def test_resumed_request_continues_the_undisturbed_run(default_model, params):
    engine = make_engine(default_model, max_batch_size=4)
    prompt = default_model.tokenizer.encode("The capital of France is a city where")
    first = _run(engine, "r", prompt, params)
    tokens, texts, last = _per_token_text(first)
    full_text = "".join(o.text for o in first)
    assert len(tokens) == 24
    for cut in (1, 5, 23):
        engine = make_engine(default_model, max_batch_size=4)
        # Another request shares the batch: a resumed row must not depend on its neighbours either.
        engine.add_request("other", prompt_token_ids=prompt[:4], sampling_params=SamplingParams(max_tokens=9))
        outs = _run(engine, "r", prompt, params, resume=tokens[:cut])
        rest, _, rest_last = _per_token_text(outs)
        assert rest == tokens[cut:], f"cut at {cut}"
        assert "".join(texts[:cut]) + "".join(o.text for o in outs) == full_text, f"cut at {cut}"
        assert rest_last.usage == last.usage and rest_last.finish_reason == last.finish_reason


def test_a_stop_string_split_by_the_cut_is_still_found(default_model):
    """Text held back as a possible stop string's start, when the replica died, is held by the resumed run too:
    the stop string is found across the cut and never streamed."""
    engine = make_engine(default_model, max_batch_size=2)
    prompt = default_model.tokenizer.encode("Count: one, two, three, four, five, six, seven")
    free = SamplingParams(max_tokens=16, ignore_eos=True)
    tokens, texts, _ = _per_token_text(_run(engine, "r", prompt, free))
    full = "".join(texts)
    stop = full[len(full) // 2: len(full) // 2 + 4]
    assert stop.strip(), full
    stopped = SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))
    engine = make_engine(default_model, max_batch_size=2)
    outs = _run(engine, "r", prompt, stopped)
    want_tokens, want_texts, want_last = _per_token_text(outs)
    want = "".join(o.text for o in outs)
    assert stop not in want and want_last.finish_reason == "stop"
    for cut in range(1, len(want_tokens)):
        engine = make_engine(default_model, max_batch_size=2)
        sent = "".join(want_texts[:cut])
        resumed = _run(engine, "r", prompt, stopped, resume=want_tokens[:cut])
        assert [t for o in resumed for t in o.new_token_ids] == want_tokens[cut:]
        assert sent + "".join(o.text for o in resumed) == want, f"cut at {cut}"


def test_resume_is_validated(default_model):
    engine = make_engine(default_model, max_batch_size=2)
    params = SamplingParams(max_tokens=3)
    with pytest.raises(FieldError) as e:
        engine.make_request("r", prompt_token_ids=[5, 6], sampling_params=params, resume_token_ids=[1, 2, 3])
    assert e.value.param == "resume_token_ids"
    with pytest.raises(FieldError) as e:
        engine.make_request("r", prompt_token_ids=[5, 6], sampling_params=params, resume_token_ids=[10**9])
    assert e.value.param == "resume_token_ids"
