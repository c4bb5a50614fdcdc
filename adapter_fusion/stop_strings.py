"""Stop strings matched as text arrives: an Aho-Corasick automaton over a request's stops, fed only
the characters each step adds, so a step costs the same with one stop or a thousand (rescanning
the whole text for every stop each step made one request's options slow the whole batch).

The automaton's state also says how much of the text must be held back from the client: its
depth is the longest suffix of the text that is still the start of some stop."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopMatcher:
    """Built once per request (cost: the stops' total length); `feed` each new piece of text."""

    def __init__(self, stops: Sequence[str]) -> None:
        # one flat edge table, not a dict per state: thousands of stops stay a few objects for the
        # garbage collector to walk, not thousands
        self._goto: dict[tuple[int, str], int] = {}  # (state, character) -> state; state 0 is the root
        self._depth = [0]  # characters from the root: the text's suffix this state stands for
        self._found = [0]  # length of the longest stop ending at this state (0: none)
        children: list[list[tuple[str, int]]] = [[]]  # for building only
        for stop in stops:
            state = 0
            for char in stop:
                nxt = self._goto.get((state, char))
                if nxt is None:
                    nxt = self._goto[(state, char)] = len(self._depth)
                    children[state].append((char, nxt))
                    children.append([])
                    self._depth.append(self._depth[state] + 1)
                    self._found.append(0)
                state = nxt
            self._found[state] = max(self._found[state], len(stop))
        self._fail = [0] * len(self._depth)
        self._link(children)
        self.state = 0
        self.seen = 0  # characters of the text fed so far

    def _link(self, children: list[list[tuple[str, int]]]) -> None:
        """Failure links breadth first: each state's longest proper suffix that is also a trie state."""
        queue = deque(nxt for _, nxt in children[0])
        while queue:
            state = queue.popleft()
            for char, nxt in children[state]:
                self._fail[nxt] = self._step(self._fail[state], char)
                self._found[nxt] = max(self._found[nxt], self._found[self._fail[nxt]])
                queue.append(nxt)

    def _step(self, state: int, char: str) -> int:
        while (state, char) not in self._goto and state:
            state = self._fail[state]
        return self._goto.get((state, char), 0)

    def feed(self, piece: str) -> int | None:
        """Advance over `piece` (the text's next characters); the index in the whole text where
        the first completed stop starts, or None. Amortised O(len(piece))."""
        for char in piece:
            self.state = self._step(self.state, char)
            self.seen += 1
            if self._found[self.state]:
                return self.seen - self._found[self.state]
        return None

    @property
    def pending(self) -> int:
        """Characters at the end of the text that may still become a stop: not yet safe to stream."""
        return self._depth[self.state]
