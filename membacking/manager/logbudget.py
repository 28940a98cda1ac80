"""How many lines one peer's rejected messages and refused requests may write to the log: the
first few of one kind from one peer in a window each get a line, the rest of that window are
counted and summed up in one line once it ends. A peer that floods invalid messages then costs
the log a few lines a window, not one per message; `stats` still counts every one.
"""

from __future__ import annotations

#: lines of one kind from one peer logged in full per window
LINES_PER_WINDOW = 10
#: seconds a window lasts
WINDOW = 10.0

#: what is counted apart: ("rejected" or "refused", the reason, the peer's pid if known)
Key = tuple[str, str, int | None]


class LogBudget:
    """Per key (kind, reason, peer): when its window began, the lines written in it and the
    lines left out of it."""

    def __init__(self, lines: int = LINES_PER_WINDOW, window: float = WINDOW) -> None:
        self.lines = lines
        self.window = window
        self._windows: dict[Key, list[float]] = {}
        #: windows over that left lines out, not yet summed up
        self._over: list[tuple[Key, int, float]] = []

    def allow(self, key: Key, now: float) -> bool:
        """Whether a line for `key` may be written now (else it is counted as left out)."""
        counts = self._windows.get(key)
        if counts is None or now - counts[0] >= self.window:
            if counts is not None and counts[2]:
                self._over.append((key, int(counts[2]), now - counts[0]))
            self._windows[key] = [now, 1, 0]
            return True
        if counts[1] < self.lines:
            counts[1] += 1
            return True
        counts[2] += 1
        return False

    def ended(self, now: float) -> list[tuple[Key, int, float]]:
        """The windows over by `now` that left lines out, each once: (key, lines left out,
        seconds since the window began). Windows over that left nothing out are forgotten."""
        over, self._over = self._over, []
        for key, (start, _, left_out) in list(self._windows.items()):
            if now - start >= self.window:
                if left_out:
                    over.append((key, int(left_out), now - start))
                del self._windows[key]
        return over
