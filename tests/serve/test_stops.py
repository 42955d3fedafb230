"""StopStrings: streamed pieces never leak a stop string or its prefix, and equal the one-shot result."""

from __future__ import annotations

import random

import pytest

from bitnet158.serve.stops import StopStrings


def run(stops, pieces) -> tuple[str, bool]:
    f = StopStrings(stops)
    out = "".join(f.push(p) for p in pieces)
    if not f.stopped:
        out += f.flush()
    return out, f.stopped


def reference(stops, text) -> tuple[str, bool]:
    """Read the text one character at a time; stop at the first stop string to complete."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def test_basic():
    assert run(["\n\n"], ["Hello\n", "\nworld"]) == ("Hello", True)
    assert run(["User:"], ["Hi U", "se", "r: x"]) == ("Hi ", True)
    assert run(["abc"], ["ab", "ab", "d"]) == ("ababd", False)     # held "ab" released when it can't match
    assert run([], ["a", "b"]) == ("ab", False)


def test_hold_back_then_release():
    f = StopStrings(["END"])
    assert f.push("The E") == "The "          # "E" could start "END"
    assert f.push("N") == ""                  # "EN" still could
    assert f.push("d") == "ENd"               # cannot any more
    assert not f.stopped and f.flush() == ""


def test_earliest_of_several_stops():
    assert run(["bc", "abcd"], ["a", "bcd"]) == ("a", True)          # "bc" completes first
    assert run(["bc", "abcd"], ["a", "b", "c", "d"]) == ("a", True)  # whatever the split
    assert run(["xbc", "bc"], ["axbcd"]) == ("a", True)              # same end: the longer one


def test_nothing_after_stop():
    f = StopStrings(["."])
    assert f.push("one. two") == "one"
    assert f.push(" three") == "" and f.flush() == ""


@pytest.mark.parametrize("seed", range(30))
def test_random_splits_match_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab\n "
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    got, stopped = run(stops, pieces)
    assert (got, stopped) == reference(stops, text)
    # streamed output is always a prefix of the final answer: nothing is ever taken back
    f = StopStrings(stops)
    acc = ""
    for p in pieces:
        acc += f.push(p)
        assert reference(stops, text)[0].startswith(acc)
