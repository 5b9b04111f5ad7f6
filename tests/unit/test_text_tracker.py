"""Incremental detokenization with stop strings."""

from __future__ import annotations

from coordinator.session.generation import TextTracker


class PieceCodec:
    """Token i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def run(pieces: list[str], rounds: list[list[int]], stop: list[str]) -> tuple[str, list[int], list[str], TextTracker]:
    tracker = TextTracker(PieceCodec(pieces), stop)
    text, ids, deltas = "", [], []
    for tokens in rounds:
        delta, new_ids = tracker.add(tokens)
        text, ids = text + delta, ids + new_ids
        deltas.append(delta)
        if tracker.stopped:
            break
    delta, new_ids = tracker.flush()
    return text + delta, ids + new_ids, deltas, tracker


def test_stop_string_split_across_rounds_is_never_emitted():
    text, ids, deltas, tracker = run(["nd", "kt", "i", "on", "ab"], [[0], [1, 2], [3], [4]], ["ion"])
    assert tracker.stopped
    assert text == "ndkt"
    assert ids == [0, 1]
    assert "i" not in "".join(deltas)


def test_token_straddling_the_stop_is_kept_and_text_cut():
    text, ids, _, _ = run(["he", "llo wor", "ld"], [[0, 1, 2]], ["wor"])
    assert text == "hello "
    assert ids == [0, 1]


def test_without_stop_everything_arrives_and_ids_follow_the_text():
    pieces = ["a", "bc", "d", "ef"]
    text, ids, deltas, _ = run(pieces, [[0], [1], [2], [3]], ["zz"])
    assert text == "abcdef" and ids == [0, 1, 2, 3]
    assert deltas[0] == ""  # one character is held back while it could start "zz"
    tracker = TextTracker(PieceCodec(pieces), [])
    assert tracker.add([0, 1]) == ("abc", [0, 1])


def test_unfinished_character_is_held_back():
    tracker = TextTracker(PieceCodec(["x", "\ufffd", "é"]), [])
    assert tracker.add([0, 1]) == ("x", [0])
    assert tracker.flush() == ("\ufffd", [1])


def test_earliest_of_several_stop_strings_wins():
    text, _, _, _ = run(["one ", "two ", "three"], [[0, 1, 2]], ["three", "two"])
    assert text == "one "
