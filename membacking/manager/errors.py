"""The manager's refusals: a control-protocol error code plus a sentence for the operator."""

from __future__ import annotations

from ..errors import MembackingError

#: codes of refusals by a limit or policy (not by the request's own content): each is counted in
#: `refused` and logged, whoever asked
POLICY_CODES = frozenset({"limit", "private"})


class Refused(MembackingError):
    """A request the manager will not carry out; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
