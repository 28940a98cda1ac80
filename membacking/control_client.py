"""Client for the manager's control channel (used by the CLI and by the Python API).

Each call sends one ControlRequest over a ZeroMQ REQ socket and waits, with a timeout, for the
ControlReply; refusals become `ControlError`, an absent manager `ManagerUnavailableError`.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

from .errors import ControlError, ManagerUnavailableError
from .protocol import messages as m
from .protocol.codec import MAX_REPLY_BYTES, decode, encode
from .protocol.errors import ProtocolError
from .protocol.messages import Channel
from .runtime import RuntimePaths


class ControlClient:
    """Talks to the manager serving `runtime_dir` (default: see `membacking.runtime`)."""

    def __init__(
        self, runtime_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0
    ) -> None:
        self.paths = RuntimePaths.resolve(runtime_dir)
        self.timeout = timeout
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Run operation `op` and return its result."""
        if not self.paths.control_socket.exists():
            raise ManagerUnavailableError(
                f"no membacking manager at {self.paths.root} "
                "(is `membacking manager run` running there?)"
            )
        wait = self.timeout if timeout is None else timeout
        sock = self._ctx.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(wait * 1000))
            sock.connect(self.paths.control_endpoint)
            sock.send(encode(m.ControlRequest(op, args)))
            try:
                data = sock.recv()
            except zmq.Again:
                raise ManagerUnavailableError(
                    f"the manager at {self.paths.root} did not answer within {wait:g}s"
                ) from None
        finally:
            sock.close()
        try:
            reply = decode(data, Channel.CONTROL, max_bytes=MAX_REPLY_BYTES)
        except ProtocolError as exc:
            raise ControlError("bad-reply", f"the manager sent an invalid reply: {exc}") from None
        if isinstance(reply, m.Error):
            raise ControlError(reply.code, reply.message)
        if not isinstance(reply, m.ControlReply):
            raise ControlError("bad-reply", f"unexpected {type(reply).__name__} from the manager")
        return reply.result

    def regions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("regions")
        return result

    def mappers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("mappers")
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("stats")
        return result

    def add_region(self, name: str, gpa: int, size: int, readonly: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self.call(
            "add_region", name=name, gpa=gpa, size=size, readonly=readonly
        )
        return result

    def remove_region(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        """Remove a region; returns after every mapper holding it acknowledged the unmap."""
        result: dict[str, Any] = self.call("remove_region", timeout=timeout, name=name)
        return result
