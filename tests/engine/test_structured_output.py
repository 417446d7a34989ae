"""Structured output (engine/grammar.py): a constraint is validated where SamplingParams is built; on the real
default model every constrained output parses and validates, greedy or seeded, alone, beside other rows,
through swap and recompute preemption and through a failover continuation; the matchers do not outlive
their requests."""

from __future__ import annotations

import gc
import json
import re
import string

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.errors import FieldError
from engine.plan import SampleSpec
from engine.request import SamplingParams
from engine.sampler import mask_disallowed
from tests.engine.test_controller_integration import PLENTY, controlled
from tests.helpers import make_engine, run_alone, run_beside, run_to_completion, tokens_of

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "employed"],
    "additionalProperties": False,
}
GREEDY = SamplingParams(max_tokens=80, json_schema=PERSON)
SEEDED = SamplingParams(max_tokens=80, json_schema=PERSON, temperature=1.0, top_p=0.95, seed=7)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def chat_ids(default_model):
    """A chat prompt asking for a person as JSON, tokenized as the chat route does."""
    tok = default_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Describe a programmer as a JSON object."}],
                                   tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def text_of(outs: list) -> str:
    return "".join(o.text for o in outs)


def assert_person(outs: list) -> dict:
    assert outs[-1].finish_reason == "stop", (outs[-1].finish_reason, text_of(outs))
    value = json.loads(text_of(outs))
    jsonschema.validate(value, PERSON)
    return value


# ---- validation, where SamplingParams is built (no model) ----------------------------------------------------
@pytest.mark.parametrize(("kwargs", "field", "says"), [
    ({"json_schema": '{"type": "object"'}, "json_schema", "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "json_schema", "must be a JSON object"),
    ({"json_schema": {"type": "objekt"}}, "json_schema", "does not compile"),
    ({"json_schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "json_schema", "does not compile"),
    ({"regex": "[a-"}, "regex", "does not compile"),
    ({"regex": ""}, "regex", "non-empty"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"choice": ["yes", ""]}, "choice", "non-empty list"),
    ({"choice": ["yes", 3]}, "choice", "non-empty list"),
    ({"regex": "a+", "choice": ["a"]}, "choice", "at most one of json_schema, regex, choice; got regex and choice"),
    ({"json_schema": {"type": "object"}, "regex": "a"}, "regex", "got json_schema and regex"),
])
def test_a_bad_constraint_is_a_field_error_naming_its_field(kwargs, field, says):
    with pytest.raises(FieldError, match=re.escape(says)) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field


def test_a_constraint_is_kept_as_plain_data():
    p = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}, max_tokens=5)
    assert p.json_schema == '{"type": "object", "properties": {"a": {"type": "integer"}}}'  # key order kept
    assert p.constraint_field == "json_schema" and p.grammar is not None
    assert SamplingParams(choice=["x", "y"]).choice == ("x", "y")
    assert SamplingParams().grammar is None and SamplingParams().constraint_field is None


# ---- the mask, in the sampler -------------------------------------------------------------------------------
def test_the_mask_leaves_only_allowed_tokens_and_only_on_constrained_rows(default_model):
    engine = make_engine(default_model)
    tok = default_model.tokenizer
    params = SamplingParams(choice=["yes", "no"])
    assert params.grammar is not None
    grammar = engine.grammars.matcher("choice", params.grammar)
    vocab = engine.vocab_size
    logits = torch.randn(3, vocab)
    specs = [SampleSpec(SamplingParams(), 0, 0), SampleSpec(params, 0, 0, grammar=grammar),
             SampleSpec(SamplingParams(), 0, 0)]
    out = mask_disallowed(logits, specs)
    assert out is not logits and torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(s) or "no".startswith(s) for s in map(tok.decode, allowed)), allowed
    assert torch.equal(out[1][allowed], logits[1][allowed])
    first = logits[:1]
    assert mask_disallowed(first, [SampleSpec(SamplingParams(), 0, 0)]) is first  # no grammar: no copy
    # Once "yes" is consumed the grammar is complete: only EOS may follow.
    assert grammar.advance(tok.encode("yes")[0]) is None and grammar.complete
    after = mask_disallowed(logits[1:2], [SampleSpec(params, 0, 1, grammar=grammar)])
    assert torch.isfinite(after[0]).nonzero().flatten().tolist() == sorted(engine.outputs.eos_token_ids)


# ---- the real model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_constrained_output_validates_against_its_schema(default_model, chat_ids, params):
    assert_person(run_alone(default_model, chat_ids, params))


def test_regex_and_choice_outputs_match(default_model, chat_ids):
    engine = make_engine(default_model)
    pattern = r"[A-Z][a-z]{1,10} (is|was) [0-9]{2}"
    engine.add_request("regex", prompt_token_ids=chat_ids,
                       sampling_params=SamplingParams(max_tokens=30, regex=pattern, temperature=0.8, seed=1))
    choices = ["Python", "Rust", "a JSON object"]
    engine.add_request("choice", prompt_token_ids=chat_ids, sampling_params=SamplingParams(max_tokens=30, choice=choices))
    tok = default_model.tokenizer
    ask = tok.apply_chat_template([{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}],
                                  tokenize=False, add_generation_prompt=True)
    engine.add_request("object", prompt_token_ids=tok(ask, add_special_tokens=False)["input_ids"],
                       sampling_params=SamplingParams(max_tokens=60, json_schema={"type": "object"}))
    outs = run_to_completion(engine)
    assert {rid: o[-1].finish_reason for rid, o in outs.items()} == dict.fromkeys(outs, "stop"), \
        {rid: text_of(o) for rid, o in outs.items()}
    assert re.fullmatch(pattern, text_of(outs["regex"])), text_of(outs["regex"])
    assert text_of(outs["choice"]) in choices
    assert isinstance(json.loads(text_of(outs["object"])), dict)
    gc.collect()
    assert engine.grammars.live == 0


def test_a_constrained_row_does_not_depend_on_its_neighbours(default_model, chat_ids):
    """Batch invariance: the same tokens alone and joining a batch of unconstrained and constrained rows."""
    alone = tokens_of(run_alone(default_model, chat_ids, SEEDED))
    others = {0: [("free", chat_ids[:20], SamplingParams(max_tokens=40, ignore_eos=True)),
                  ("other", chat_ids, SamplingParams(max_tokens=40, regex="[a-z ]{1,60}", ignore_eos=True))],
              1: [("late", chat_ids[5:], SamplingParams(max_tokens=30, ignore_eos=True))]}
    beside = run_beside(default_model, chat_ids, SEEDED, others)
    assert tokens_of(beside["target"]) == alone
    assert_person(beside["target"])


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_constrained_output_survives_preemption(default_model, chat_ids, mode):
    """Two constrained rows; an urgent arrival displaces the younger, whose matcher comes back with its KV
    (swap) or is rebuilt by replaying its tokens (recompute). Every output validates and equals its run alone."""
    engine = controlled(default_model, PLENTY, rows=2, min_priority_gap=5, preemption_mode=mode)
    arrivals = {0: [("a", GREEDY, 5)], 1: [("b", SEEDED, 5)], 4: [("c", SamplingParams(max_tokens=6), 0)]}
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests() or engine.iteration <= max(arrivals):
        for rid, params, priority in arrivals.get(engine.iteration, []):
            engine.add_request(rid, prompt_token_ids=chat_ids, sampling_params=params, priority=priority)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        assert engine.iteration < 500
    assert engine.stats.preemptions_by_mode[mode] == 1, engine.stats.preemptions_by_mode
    for rid, params in (("a", GREEDY), ("b", SEEDED)):
        assert_person(outs[rid])
        assert tokens_of(outs[rid]) == tokens_of(run_alone(default_model, chat_ids, params)), rid
    gc.collect()
    assert engine.grammars.live == 0


@pytest.mark.parametrize("policy", ["static", "orca", "baton"])
def test_every_policy_gives_the_same_constrained_output(tiny_model, policy):
    """In-batch joins (static, orca) and baton's same-iteration join (its batch row draws right after its
    prefill, from the matcher that draw advanced) give baton-pd's tokens; a one-token choice finishes at once."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "b": {"type": "string", "maxLength": 5}}, "required": ["a", "b"],
              "additionalProperties": False}
    prompts = {"json": ([1, 2, 3, 4], SamplingParams(max_tokens=60, json_schema=schema, temperature=1.0, seed=3)),
               "one": ([5, 6], SamplingParams(max_tokens=8, choice=["{"]))}
    for rid, (ids, params) in prompts.items():
        want = run_alone(tiny_model, ids, params)
        got = run_alone(tiny_model, ids, params, policy=policy)
        assert tokens_of(got) == tokens_of(want) and got[-1].finish_reason == "stop", (rid, text_of(got))
    assert text_of(run_alone(tiny_model, [5, 6], prompts["one"][1], policy=policy)) == "{"


def test_a_continuation_replays_its_tokens_through_the_grammar(default_model, chat_ids):
    """Failover: resuming after k tokens continues exactly as the undisturbed run, and the text parses."""
    full = run_alone(default_model, chat_ids, SEEDED)
    tokens = tokens_of(full)
    k = len(tokens) // 2
    engine = make_engine(default_model)
    engine.enqueue(engine.make_request("r", prompt_token_ids=chat_ids, sampling_params=SEEDED,
                                       resume_token_ids=tokens[:k]))
    rest = run_to_completion(engine)["r"]
    assert tokens_of(rest) == tokens[k:] and rest[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(default_model.tokenizer.decode(tokens)), PERSON)


def test_resumed_tokens_that_break_the_grammar_are_refused(default_model, chat_ids):
    engine = make_engine(default_model)
    bad = default_model.tokenizer.encode("hello")
    with pytest.raises(FieldError, match="resume_token_ids do not follow") as e:
        engine.make_request("r", prompt_token_ids=chat_ids, sampling_params=SEEDED, resume_token_ids=bad)
    assert e.value.param == "resume_token_ids"


def test_matchers_do_not_outlive_finished_or_aborted_requests(default_model, chat_ids):
    engine = make_engine(default_model, max_batch_size=4)
    for rid in ("done", "aborted", "aborted too"):
        engine.add_request(rid, prompt_token_ids=chat_ids, sampling_params=GREEDY)
    first = engine.step() + engine.step()
    assert engine.grammars.live == 3
    engine.abort_request("aborted")
    engine.abort_request("aborted too")
    outs = run_to_completion(engine)
    assert_person([o for o in first if o.request_id == "done"] + outs["done"])
    gc.collect()
    assert engine.grammars.live == 0


# ---- a property: a grammar-constrained output always parses --------------------------------------------------
_LEAF = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 200)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=5), min_size=1, max_size=3, unique=True)
    .map(lambda vals: {"enum": vals}),
)
_SCHEMA = st.one_of(
    _LEAF,
    st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4), _LEAF, min_size=1, max_size=3)
    .map(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                        "additionalProperties": False}),
    st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, _LEAF, st.integers(0, 3)),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_SCHEMA, seed=st.integers(0, 2**31))
def test_property_constrained_output_always_parses(tiny_model, schema, seed):
    """A random small schema, sampled at temperature 1 from a random-weight model: whatever it draws, the
    grammar keeps it valid, and the output ends with "stop" once the value is complete."""
    params = SamplingParams(max_tokens=150, json_schema=schema, temperature=1.0, seed=seed)
    outs = run_alone(tiny_model, [1, 2, 3, 4], params)
    assert outs[-1].finish_reason == "stop", (schema, text_of(outs))
    jsonschema.validate(json.loads(text_of(outs)), schema)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.text(string.ascii_letters + " ,.!", min_size=1, max_size=12), min_size=1, max_size=4,
                        unique=True), seed=st.integers(0, 2**31))
def test_property_a_choice_output_is_one_of_the_choices(tiny_model, choices, seed):
    outs = run_alone(tiny_model, [5, 6, 7], SamplingParams(max_tokens=40, choice=choices, temperature=1.0, seed=seed))
    assert outs[-1].finish_reason == "stop" and text_of(outs) in choices, (choices, text_of(outs))
