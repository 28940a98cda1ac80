"""A small synchronous client of QEMU's monitor protocol (QMP) over its Unix socket."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import MembackingError


class QmpError(MembackingError):
    """QEMU refused a command, or its monitor cannot be reached."""


class Qmp:
    """One QMP session: `execute()` commands, events are kept in `events`."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
            self._file = self._sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"{self.path} is not a QMP monitor")
            self.execute("qmp_capabilities")
        except TimeoutError:  # connected, but no greeting: QEMU greets one client at a time
            self._sock.close()
            raise QmpError(
                f"the QEMU monitor at {self.path} did not answer in {timeout:g}s: another "
                "client may hold it (QEMU's monitor serves one client at a time)"
            ) from None
        except ConnectionRefusedError:  # the socket file stays when its QEMU was killed
            self._sock.close()
            raise QmpError(
                f"no QEMU listens on the monitor {self.path}: a socket left by a VM whose "
                "launcher or QEMU was killed (no VM of that name runs)"
            ) from None
        except OSError as exc:
            self._sock.close()
            raise QmpError(f"cannot reach the QEMU monitor at {self.path}: {exc}") from None
        except BaseException:
            self._sock.close()
            raise

    @classmethod
    def wait(cls, path: str | Path, timeout: float, alive: Any = None) -> Qmp:
        """Connect once the monitor at `path` answers (while `alive()` stays true)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(path)
            except QmpError:
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise
                time.sleep(0.05)

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError(f"the QEMU monitor at {self.path} closed the connection")
        try:
            value = json.loads(line)
        except ValueError:
            raise QmpError(f"the QEMU monitor sent invalid JSON: {line[:80]!r}") from None
        if not isinstance(value, dict):
            raise QmpError(f"the QEMU monitor sent {value!r}")
        return value

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command` and return its result; QEMU's error becomes a QmpError."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = self._read()
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    error = reply["error"]
                    raise QmpError(f"QEMU refused {command}: {error.get('desc', error)}")
                return reply.get("return")
        except OSError as exc:
            raise QmpError(f"the QEMU monitor at {self.path} failed: {exc}") from None

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command (e.g. `xp /16xb 0x7000`) and return its text."""
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
