"""Errors raised by the protocol layer.

`ProtocolError` is raised when a peer sends something that is not a valid message; its text says
what was wrong in words an operator can act on.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message (or its ancillary fds) violates the wire protocol."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        #: a short machine-friendly tag ("too-large", "bad-type", "fd-count", ...) used to count
        #: rejections by reason.
        self.reason = reason
