"""Incremental detokenisation with the real tokenizer, and stop-string matching across deltas."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

PROMPT = "Here is some text:"
TEXTS = {
    "ascii": " The quick brown fox jumps over the lazy dog. 123 + 456 = 579!",
    "emoji": " Party time 🎉🎉 with family 👨‍👩‍👧 and a 🦄, done 😀.",
    "cjk": " 你好，世界。日本語のテキストです。한국어 문장.",
    "accented": " Café naïve résumé – São Paulo, Zürich, Ærø, façade, ŝi ĝuas.",
}


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


def stream(tok, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_streaming_equals_full_decode(tok, kind: str) -> None:
    prompt_ids = tok.encode(PROMPT)
    text = TEXTS[kind]
    ids = tok.encode(text)
    deltas = stream(tok, prompt_ids, ids)
    full = tok.decode(prompt_ids + ids)
    assert full == PROMPT + text  # the tokenizer round-trips this text
    assert "".join(deltas) == text
    assert "".join(deltas) == full[len(tok.decode(prompt_ids)) :]
    # Valid text never shows a replacement character, not even for a moment.
    assert not any("\ufffd" in d for d in deltas), deltas
    # Every intermediate state is a prefix of the final text.
    acc = ""
    for d in deltas:
        acc += d
        assert text.startswith(acc)


@pytest.mark.parametrize("kind", ["emoji", "cjk", "accented"])
def test_multibyte_text_really_splits_characters_over_tokens(tok, kind: str) -> None:
    """The multi-byte cases must exercise the hold-back path: some token alone decodes to U+FFFD."""
    ids = tok.encode(TEXTS[kind])
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    held = [d for d in stream(tok, tok.encode(PROMPT), ids)[:-1] if d == ""]
    assert held, "no token was held back"


def test_first_token_gets_its_leading_space_from_prompt_context(tok) -> None:
    prompt_ids = tok.encode("Hello")
    ids = tok.encode(" world")
    assert "".join(stream(tok, prompt_ids, ids)) == " world"


def test_flush_releases_an_incomplete_character(tok) -> None:
    emoji_ids = tok.encode("🦄")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    assert detok.push(emoji_ids[:1]) == ""  # incomplete: held
    tail = detok.flush()
    assert tail and tail.endswith("\ufffd")  # at the end of a request, whatever is pending goes out


# ---- StopStringMatcher --------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool, int]:
    """(emitted text, stopped, index of the delta that stopped it or -1)."""
    out = ""
    for i, d in enumerate(deltas):
        text, stopped = matcher.feed(d)
        out += text
        if stopped:
            return out, True, i
    return out + matcher.flush(), False, -1


def test_stop_string_split_across_deltas_is_found_and_excluded() -> None:
    m = StopStringMatcher(("world",))
    assert m.feed("Hel") == ("Hel", False)
    assert m.feed("lo wor") == ("lo ", False)  # "wor" may start "world": held back
    assert m.feed("ld") == ("", True)
    assert feed_all(StopStringMatcher(("lo wo",)), ["Hel", "lo wor", "ld"]) == ("Hel", True, 1)
    assert feed_all(StopStringMatcher(("Hello world",)), ["Hel", "lo wor", "ld"]) == ("", True, 2)


def test_partial_prefix_is_held_then_released() -> None:
    m = StopStringMatcher(("world",))
    assert m.feed("Hello wo") == ("Hello ", False)
    assert m.held == "wo"
    assert m.feed("nder") == ("wonder", False)
    assert m.held == ""
    assert m.feed("ful w") == ("ful ", False)
    assert m.feed("ide") == ("wide", False)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert feed_all(StopStringMatcher(("bar", "foo")), ["xx foo yy bar zz"]) == ("xx ", True, 0)
    assert feed_all(StopStringMatcher(("bar", "foo")), ["xx b", "ar foo"]) == ("xx ", True, 1)
    assert feed_all(StopStringMatcher(("\n\n", "END")), ["one\n", "\ntwo END"]) == ("one", True, 1)


def test_flush_releases_held_text() -> None:
    m = StopStringMatcher(("world", "wonder"))
    assert m.feed("Hello wo") == ("Hello ", False)
    assert m.flush() == "wo"
    assert m.flush() == ""
    assert m.feed("x") == ("x", False)


def test_no_stop_strings_passes_everything_through() -> None:
    m = StopStringMatcher(())
    assert m.feed("anything wo") == ("anything wo", False)
    assert m.flush() == ""


def test_nested_stop_strings_do_not_depend_on_delta_boundaries() -> None:
    stops = ("abcdef", "cd")
    streamed = feed_all(StopStringMatcher(stops), ["ab", "cd", "ef"])[0]
    whole = feed_all(StopStringMatcher(stops), ["abcdef"])[0]
    assert streamed == whole == "ab"  # "cd" is complete first; the text before it is "ab"


def _no_nesting(stops: list[str]) -> bool:
    return not any(a != b and a in b for a in stops for b in stops)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc d", max_size=30),
    stops=st.lists(st.text(alphabet="abc d", min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
    .filter(_no_nesting),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_matching_is_independent_of_delta_boundaries(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, stopped, _ = feed_all(StopStringMatcher(tuple(stops)), deltas)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        assert stopped and out == text[: min(hits)]
    else:
        assert not stopped and out == text
