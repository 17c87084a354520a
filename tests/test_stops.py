"""StopMatcher: stop strings over streamed text, checked against a whole-text reference at every split."""
import itertools

import pytest

from bitnet_batch.errors import ConfigError
from bitnet_batch.sampling import StopMatcher


def reference(text, stops):
    """(output, stopped) for the whole text at once: cut before the stop string that ends first, ties to the
    one that starts first."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return (text, False) if best is None else (text[: best[1]], True)


def stream(stops, pieces):
    """Push the pieces; check after every push that what was emitted so far is a prefix of the final answer
    (so no part of a stop string ever leaks). Returns (output, stopped)."""
    final, _ = reference("".join(pieces), stops)
    m = StopMatcher(stops)
    out, stopped = "", False
    for p in pieces:
        emitted, stopped = m.push(p)
        out += emitted
        assert final.startswith(out), (pieces, out)
        if stopped:
            break
    if not stopped:
        out += m.flush()
    return out, stopped


def all_splits(text):
    """Every way of cutting text into consecutive non-empty pieces (2**(len-1) of them)."""
    for cuts in itertools.product((False, True), repeat=len(text) - 1):
        pieces, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                pieces.append(text[start:i])
                start = i
        pieces.append(text[start:])
        yield pieces


CASES = [
    (["</s>"], "ab</s>cd"),                # plain stop in the middle
    (["</s>"], "ab</xs>"),                 # a near miss: everything is released
    (["ab", "abc"], "xabcd"),              # a stop that is a prefix of another: the shorter completes first
    (["abc", "bc"], "xabcy"),              # both end at the same char: the one starting first wins
    (["bcd", "abcx"], "zabcde"),           # a longer candidate fails, a shorter overlapping one matches
    (["aab"], "aaaab"),                    # self-overlapping stop string
    (["\n\n", "END"], "a\nb\nEND\n\n"),    # several stops; the first to complete wins
    (["###"], "abc##"),                    # held text released by flush
    (["é!", "🙂"], "aé?é!🙂"),             # non-ASCII
]


@pytest.mark.parametrize("stops,text", CASES)
def test_every_split_matches_whole_text_reference(stops, text):
    expected = reference(text, stops)
    for pieces in all_splits(text):
        assert stream(stops, pieces) == expected, pieces


def test_expected_outputs_of_reference_cases():
    # pin the reference itself so the split test cannot pass with a wrong reference
    got = [reference(text, stops) for stops, text in CASES]
    assert got == [("ab", True), ("ab</xs>", False), ("x", True), ("x", True), ("za", True), ("aa", True),
                   ("a\nb\n", True), ("abc##", False), ("aé?", True)]


def test_holds_back_possible_stop_prefix_and_flush_releases_it():
    m = StopMatcher(["###"])
    assert m.push("abc#") == ("abc", False)
    assert m.push("#") == ("", False)
    assert m.push("x") == ("##x", False)        # the prefix broke: released at once
    assert m.push("##") == ("", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_stop_discards_the_rest_and_later_pushes():
    m = StopMatcher(["STOP", "END"])
    assert m.push("one END two STOP") == ("one ", True)
    assert m.matched == "END"
    assert m.push("more") == ("", True)
    assert m.flush() == ""
    m.reset()
    assert m.push("again") == ("again", False)
    assert not m.stopped and m.matched is None


def test_no_stops_passes_text_through():
    m = StopMatcher([])
    assert m.push("a#b") == ("a#b", False)
    assert m.flush() == ""


def test_single_string_and_validation():
    assert StopMatcher("##").push("a##") == ("a", True)
    with pytest.raises(ConfigError, match="non-empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(ConfigError, match="non-empty"):
        StopMatcher([3])


def test_long_stream_char_by_char_keeps_hold_back_short():
    m = StopMatcher(["<|eot_id|>"])
    text = "x" * 500 + "<|eot" + "y" * 10
    out = "".join(m.push(c)[0] for c in text)
    assert out == "x" * 500 + "<|eot" + "y" * 10
    assert m.flush() == ""
