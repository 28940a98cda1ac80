"""Planned handover (`manager run --takeover`): a new daemon process asks the running one, on its
control socket, to journal its state and stop with Shutdown `restarting` (keeping the state
directory); then it adopts that state and serves the same runtime directory.

Both sides live here: `answer` (the running daemon's side of the `handover` operation) and
`take_over` (the new process's side, before it claims the runtime directory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .. import trace
from ..control_client import ControlClient
from ..errors import ControlError, ManagerUnavailableError, MembackingError
from ..protocol import messages as m
from ..protocol.messages import Channel
from ..runtime import RuntimePaths
from .errors import Refused
from .journal import FORMAT_VERSION, JournalError
from .model import Effect, Send
from .snapshot import capture, check_fits
from .statedir import StateDirError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("membacking.manager")

#: the control operation a new daemon sends the running one
OP = "handover"
#: what the two daemons agree on in a handover: the operation's arguments and answer, and that
#: the state moves through the state directory. Two versions hand over only if equal.
HANDOVER_VERSION = 1
#: how long a new daemon keeps asking while the running one has changes waiting on mappers
#: (longer than the default --unmap-timeout, after which such a change ends by eviction)
BUSY_WAIT = 35.0
#: pause between two asks while the running daemon is busy
BUSY_POLL = 0.05
#: how long a new daemon waits for the one that agreed to hand over to release the directory
RELEASE_WAIT = 30.0


class HandoverError(MembackingError):
    """The running daemon cannot hand over to this one (nothing was changed)."""


# ---- the running daemon's side ---------------------------------------------------------------


def answer(daemon: Daemon, identity: bytes, msg: m.ControlRequest) -> list[Effect]:
    """The `handover` operation: refuse (with a reason a new daemon can show) or agree, then
    stop keeping the state (the reply leaves before the shutdown starts). Any request read
    after the daemon agreed to stop (in the same batch) is refused (`shutting-down`), not half
    done."""
    args = msg.args
    trace.mark("handover.asked")
    try:
        if daemon._stop_reason is not None:
            raise Refused(
                "shutting-down",
                f"this manager is stopping ({daemon._stop_reason}): nothing was done; ask "
                "the manager that takes its place",
            )
        result = _agree(daemon, args)
    except Refused as exc:
        log.warning("handover refused: %s", exc)
        return [Send(Channel.CONTROL, identity, m.Error(exc.code, str(exc)))]
    trace.mark("handover.agreed")
    daemon.stop(f"handing over to pid {args['pid']}")
    return [Send(Channel.CONTROL, identity, m.ControlReply(result))]


def _agree(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    version, journal_version, pid = args.get("version"), args.get("journal"), args.get("pid")
    if set(args) != {"version", "journal", "pid"} or not all(
        type(v) is int for v in (version, journal_version, pid)
    ):
        raise Refused("bad-request", "handover takes integers version, journal and pid")
    if version != HANDOVER_VERSION:
        raise Refused(
            "version-mismatch",
            f"this manager speaks handover version {HANDOVER_VERSION}, the new one "
            f"{version}: stop this one (`manager run --keep-state` + SIGTERM) and start the "
            "new one instead",
        )
    assert isinstance(journal_version, int)
    if journal_version < FORMAT_VERSION:
        raise Refused(
            "version-mismatch",
            f"this manager writes journal version {FORMAT_VERSION}, the new one reads up "
            f"to version {journal_version} only",
        )
    persist = daemon.persist
    if persist is None:
        raise Refused(
            "no-state",
            "this manager runs without a state directory (--no-state): its memory ends with "
            "it and cannot be handed over",
        )
    state = daemon.state
    pending = sorted({op.what for op in state._pending.values()})
    if pending:
        raise Refused(
            "busy",
            f"changes wait for mappers' acknowledgements ({', '.join(pending)}); "
            "hand over once they are done",
        )
    snapshot = capture(state, daemon.store, persist.state_id, str(daemon.paths.root))
    volatile = sorted({b.kind for b in snapshot.backings if b.kind in ("memfd", "hugetlb")})
    if volatile:
        names = sorted(
            r.name
            for r in snapshot.regions
            if any(
                b.kind in volatile
                for b in snapshot.backings
                if b.mappable_id in {s.mappable_id for s in r.submappings}
            )
        )
        raise Refused(
            "volatile-memory",
            f"region(s) {', '.join(names[:10])} hold {' and '.join(volatile)} memory, which "
            "lives in no file and would be lost: remove them first",
        )
    persist.config = dataclasses.replace(persist.config, keep=True)
    log.warning("handing over to pid %d (a new manager on %s)", pid, daemon.paths.root)
    return {
        "pid": os.getpid(),
        "instance": daemon.instance,
        "version": HANDOVER_VERSION,
        "journal": FORMAT_VERSION,
        "regions": len(snapshot.regions),
    }


# ---- the new daemon's side -------------------------------------------------------------------


def precheck(daemon: Daemon) -> bool:
    """Refuse, before the running daemon is asked, a state this one could not adopt (another
    address space, an initial region that differs): the running daemon would be gone and this
    one refuse to start. HandoverError if so. Without the service manager's fd store, the
    state is adopted here already, as it stands (`Persistence.prepare`): returns True then."""
    persist = daemon.persist
    if persist is None:
        raise HandoverError("--takeover adopts the running manager's state: not with --no-state")
    prepare = daemon.fdstore is None
    try:
        snapshot = persist.prepare(daemon.state, daemon.store) if prepare else persist.dir.read()
        if snapshot is None:
            raise HandoverError(
                f"nothing to take over: no state in {persist.dir.root} (the running manager "
                "keeps none there: it runs with --no-state, or another --state-dir)"
            )
        check_fits(snapshot, str(daemon.paths.root), daemon.config.address_space)
    except (JournalError, StateDirError) as exc:
        raise HandoverError(f"cannot take over the state in {persist.dir.root}: {exc}") from None
    have = {r.name: r for r in snapshot.regions}
    for spec in daemon.config.regions:
        rec = have.get(spec.name)
        want = (spec.gpa, spec.size, spec.readonly, spec.backing, spec.file)
        if rec is not None and (rec.gpa, rec.size, not rec.writable, rec.backing, rec.path) != want:
            raise HandoverError(
                f"region {spec.name!r} of the running manager differs from --region/config; "
                "nothing was changed"
            )
    return prepare


def take_over(daemon: Daemon, timeout: float = 10.0) -> tuple[bool, dict[str, Any]]:
    """Ask the daemon serving `daemon`'s runtime directory to hand over, and wait until it has
    released it. Returns whether its state was prepared (`precheck`) and its answer.
    HandoverError if it cannot (it keeps serving then)."""
    paths = daemon.paths
    client = ControlClient(paths.root, timeout=timeout)
    if paths.manager_running() is False:
        raise HandoverError(f"nothing to take over: no membacking manager at {paths.root}")
    trace.mark("takeover.prepare")
    prepared = precheck(daemon)
    args = {"version": HANDOVER_VERSION, "journal": FORMAT_VERSION, "pid": os.getpid()}
    trace.mark("takeover.ask")
    deadline = time.monotonic() + BUSY_WAIT
    try:
        while True:
            try:
                result: dict[str, Any] = client.call(OP, **args)
                break
            except ControlError as exc:
                if exc.code == "busy" and time.monotonic() < deadline:
                    time.sleep(BUSY_POLL)
                    continue
                if exc.code == "bad-request" and repr(OP) in str(exc):
                    raise HandoverError(
                        f"the manager at {paths.root} does not know how to hand over (an older "
                        "release): stop it with --keep-state and start this one instead"
                    ) from None
                raise HandoverError(
                    f"the manager at {paths.root} refuses to hand over: {exc}"
                ) from None
            except ManagerUnavailableError as exc:
                raise HandoverError(f"nothing to take over: {exc}") from None
    finally:
        client.close()
    trace.mark("takeover.agreed")
    _await_release(paths, result["pid"])
    trace.mark("takeover.released")
    return prepared, result


def _await_release(paths: RuntimePaths, pid: int) -> None:
    """Wait until the daemon that agreed has released the runtime directory's lock."""
    deadline = time.monotonic() + RELEASE_WAIT
    while paths.manager_running() is not False:
        if time.monotonic() >= deadline:
            raise HandoverError(
                f"the manager (pid {pid}) agreed to hand over but still holds {paths.root} "
                f"after {RELEASE_WAIT:g}s"
            )
        time.sleep(0.002)
