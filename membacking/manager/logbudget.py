"""How many lines peers' rejected messages and refused requests may write to the log: the first
10 of one kind from one peer in a window each get a line, and 100 from all peers together; the
rest of that window are counted and summed up in one line once it ends. A peer flooding invalid
messages, or a loop of new processes each sending one, then costs the log a few lines a window,
not one per message; `stats` still counts every one.
"""

from __future__ import annotations

from typing import Any

#: lines of one kind (rejected/refused, reason) from one peer logged in full per window
LINES_PER_WINDOW = 10
#: lines of one kind from all peers together logged in full per window
LINES_EVERY_PEER = 100
#: seconds a window lasts
WINDOW = 10.0
#: the pid standing for all peers together
EVERY_PEER = -1

#: what is counted apart: ("rejected" or "refused", the reason, the peer's pid if known)
Key = tuple[str, str, int | None]


class LogBudget:
    """Per key: when its window began, the lines written in it and the lines left out."""

    def __init__(
        self,
        lines: int = LINES_PER_WINDOW,
        every_peer: int = LINES_EVERY_PEER,
        window: float = WINDOW,
    ) -> None:
        self.lines = lines
        self.every_peer = every_peer
        self.window = window
        self._windows: dict[Key, list[float]] = {}
        #: windows over that left lines out, not yet summed up
        self._over: list[tuple[Key, int, float]] = []

    def allow(self, kind: str, reason: str, pid: int | None, now: float) -> bool:
        """Whether a line of `kind` and `reason` from `pid` may be written now (else it is
        counted as left out: by its peer's window, or by all peers' if only that is full)."""
        return self._allow((kind, reason, pid), self.lines, now) and self._allow(
            (kind, reason, EVERY_PEER), self.every_peer, now
        )

    def _allow(self, key: Key, lines: int, now: float) -> bool:
        counts = self._windows.get(key)
        if counts is None or now - counts[0] >= self.window:
            if counts is not None and counts[2]:
                self._over.append((key, int(counts[2]), now - counts[0]))
            self._windows[key] = [now, 1, 0]
            return True
        if counts[1] < lines:
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

    def summaries(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """A log line (and its `extra` fields) for each window `ended` by `now`."""
        lines = []
        for (kind, reason, pid), left_out, seconds in self.ended(now):
            what = {"rejected": "rejected messages", "refused": "refused requests"}.get(
                kind, f"{kind} lines"
            )
            if pid == EVERY_PEER:
                who = "several peers"
            elif pid is not None:
                who = f"pid {pid}"
            else:
                who = "peers of unknown pid" if kind == "rejected" else "control clients"
            counted = " (stats counts each)" if kind in ("rejected", "refused") else ""
            text = f"{left_out} more {what} ({reason}) from {who} in {seconds:.0f}s were not logged"
            text += counted
            peer = pid if pid != EVERY_PEER else None
            lines.append((text, {"reason": reason, "peer_pid": peer, "not_logged": left_out}))
        return lines
