"""Prompt lookup: propose the token that followed the last n tokens when they occurred before.

Text that repeats spans of its context (extraction, summaries that quote, code that reuses
names) is predicted well by copying: if the last n tokens appeared earlier in the session, the
token that followed them then is a likely next token, and finding it costs no model step.

`NgramIndex` keeps, for every n in [min_n, max_n], the latest position where each n-gram of a
session's committed tokens was followed by a known token. A guess is looked up with the
longest n first, since a longer match predicts better. It is a proposal like any other: the
oracle verifies it, so output is unchanged whatever the index guesses (a sampled session sends
it as a one-token distribution q, which rejection sampling handles exactly).
"""

from __future__ import annotations


class NgramIndex:
    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram lengths need 1 <= min_n <= max_n, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._follower: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after it

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append committed tokens; each n-gram that ends just before one learns it as its follower."""
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._follower[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def match(self, recent: list[int]) -> tuple[int, int] | None:
        """(the token that followed the longest n-gram ending `recent`, that n), or None when no n-gram
        matches; the last max_n tokens of `recent` are enough."""
        for n in range(min(self.max_n, len(recent)), self.min_n - 1, -1):
            position = self._follower.get(tuple(recent[len(recent) - n :]))
            if position is not None:
                return self.tokens[position], n
        return None
