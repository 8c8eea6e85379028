"""StopStringMatcher: stop strings across delta boundaries, hold-back, truncation, flush."""
from __future__ import annotations

import random

import pytest

from taskloom.tokenizer.stop import StopStringMatcher


def feed(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], str | None]:
    """Push deltas until a match; return the emitted pieces and the matched stop string."""
    emitted = []
    for delta in deltas:
        out, matched = matcher.push(delta)
        emitted.append(out)
        if matched is not None:
            return emitted, matched
    emitted.append(matcher.flush())
    return emitted, None


def test_stop_inside_one_delta_truncates_before_it() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("Hello STOP world") == ("Hello ", "STOP")
    assert matcher.matched == "STOP"


def test_stop_spanning_deltas_is_never_emitted() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("Hel") == ("Hel", None)
    assert matcher.push("lo S") == ("lo ", None)
    assert matcher.push("TO") == ("", None)
    assert matcher.push("P and more") == ("", "STOP")


def test_partial_prefix_released_when_it_does_not_complete() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("a ST") == ("a ", None)
    assert matcher.push("O") == ("", None)
    assert matcher.push("X") == ("STOX", None)
    assert matcher.flush() == ""


def test_overlapping_prefix_keeps_the_right_tail() -> None:
    matcher = StopStringMatcher(["aab"])
    outputs = [matcher.push(ch) for ch in "aaab"]
    assert outputs == [("", None), ("", None), ("a", None), ("", "aab")]


def test_self_overlapping_stop_string() -> None:
    emitted, matched = feed(StopStringMatcher(["abab"]), ["xab", "a", "bab"])
    assert "".join(emitted) == "x"
    assert matched == "abab"


def test_first_completed_stop_string_wins() -> None:
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", "lo w")


def test_same_end_prefers_the_longer_stop_string() -> None:
    matcher = StopStringMatcher(["bc", "abc"])
    assert matcher.push("xabc") == ("x", "abc")


def test_several_stop_strings_across_deltas() -> None:
    emitted, matched = feed(StopStringMatcher(["\n\n", "User:", "###"]),
                            ["Answer: 4", "2.\n", "U", "ser", ": next"])
    assert "".join(emitted) == "Answer: 42.\n"
    assert matched == "User:"


def test_include_stop_str_in_output() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert matcher.push("Hel") == ("Hel", None)
    assert matcher.push("lo S") == ("lo S", None)
    assert matcher.push("TOP and more") == ("TOP", "STOP")


def test_include_stop_str_inside_one_delta_drops_the_rest() -> None:
    matcher = StopStringMatcher(["</s>"], include_stop_str_in_output=True)
    assert matcher.push("done</s>tail") == ("done</s>", "</s>")


def test_flush_returns_held_text() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("the end ST") == ("the end ", None)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_no_stop_strings_pass_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_push_after_match_raises() -> None:
    matcher = StopStringMatcher(["x"])
    matcher.push("ax")
    with pytest.raises(RuntimeError, match="already matched"):
        matcher.push("more")


@pytest.mark.parametrize("stop", [[""], ["ok", 3], "STOP"])
def test_invalid_stop_strings_are_rejected(stop: object) -> None:
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(stop)  # type: ignore[arg-type]


def expected_output(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: scan the text as it grows one character at a time."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


@pytest.mark.parametrize("include", [False, True])
def test_random_splits_match_the_reference(include: bool) -> None:
    rng = random.Random(1234)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        want_text, want_stop = expected_output(text, stops, include)
        matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
        emitted, matched = feed(matcher, deltas)
        assert ("".join(emitted), matched) == (want_text, want_stop), (stops, deltas)
        for k in range(len(emitted)):
            assert want_text.startswith("".join(emitted[:k + 1])), (stops, deltas)
