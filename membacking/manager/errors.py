"""The manager's refusals: a control-protocol error code plus a sentence for the operator."""

from __future__ import annotations

from ..errors import MembackingError


class Refused(MembackingError):
    """A request the manager will not carry out; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
