"""Sending a running VM to a waiting QEMU over QMP, and knowing whether the destination took it.

QEMU's source reports `completed` as soon as it has sent the last byte, whether or not the
destination could load the stream. With the `return-path` capability the destination answers
on the same connection: the source then waits for that answer and reports `failed` when the
load failed (the source resumes its guest). That answer is what `qemu migrate --quit` needs
before it may stop the source.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from .binary import QemuError
from .qmp import Qmp, QmpError

#: URIs whose peer is a QEMU that can answer on the connection (the return path); `exec:`,
#: `fd:` and the rest may write to a file or a pipe that never answers
ANSWERING_SCHEMES = ("tcp:", "unix:", "vsock:")


class MigrationError(QemuError):
    """The migration failed, was cancelled or did not finish in time."""


@dataclass(frozen=True)
class Outcome:
    """What `query-migrate` said at the end; `confirmed`: the destination loaded the stream
    (the return path was on), else `unconfirmed` says why that cannot be known."""

    info: dict[str, Any]
    confirmed: bool
    unconfirmed: str = ""


def _return_path(qmp: Qmp) -> bool:
    """Whether the source's `return-path` capability is on."""
    capabilities = qmp.execute("query-migrate-capabilities")
    return any(c.get("capability") == "return-path" and c.get("state") for c in capabilities)


def _set_return_path(qmp: Qmp, on: bool) -> None:
    qmp.execute(
        "migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": on}]
    )


def _ask_for_answer(qmp: Qmp, uri: str) -> str:
    """Turn on the return path; '' if it is on, else why the destination's verdict cannot be
    known."""
    if not uri.startswith(ANSWERING_SCHEMES):
        return f"{uri.split(':', 1)[0]}: URIs have no destination that answers"
    try:
        _set_return_path(qmp, True)
    except QmpError as exc:
        if "refused" not in str(exc):
            raise
        return f"QEMU would not turn on its return path ({exc})"
    return "" if _return_path(qmp) else "QEMU did not turn on its return path"


def migrate(qmp: Qmp, uri: str, deadline: float, timeout: float, confirm: bool) -> Outcome:
    """Send the VM behind `qmp` to `uri` and wait for the end (cancelled at `deadline`). With
    `confirm` (what `--quit` needs), the return path is on where the URI's peer can answer,
    so the source waits for the destination's verdict; without, it is off (a `tcp:` peer that
    is not a QEMU, such as a process saving the stream, never answers: the source would wait
    for the whole timeout with its guest paused). QEMU keeps capabilities: the return path is
    set back as it was afterwards, so a later migration is not made to wait for an answer
    from a peer that cannot give one."""
    before = _return_path(qmp)
    unconfirmed = _ask_for_answer(qmp, uri) if confirm else "not asked for"
    if before and (not confirm or not uri.startswith(ANSWERING_SCHEMES)):
        _set_return_path(qmp, False)
    try:
        return _wait(qmp, uri, deadline, timeout, unconfirmed)
    finally:
        with contextlib.suppress(QmpError, OSError):  # a migration still being cancelled
            if _return_path(qmp) != before:
                _set_return_path(qmp, before)


def _wait(qmp: Qmp, uri: str, deadline: float, timeout: float, unconfirmed: str) -> Outcome:
    qmp.execute("migrate", uri=uri)
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return Outcome(info, not unconfirmed, unconfirmed)
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc") or (
                "the destination did not load it (see its QEMU's messages)"
                if not unconfirmed
                else "no reason given"
            )
            raise MigrationError(f"migration {status}: {reason}; the source VM is kept")
        if time.monotonic() > deadline:
            qmp.execute("migrate_cancel")
            raise MigrationError(f"migration did not finish in {timeout:g}s: cancelled")
        time.sleep(0.05)
