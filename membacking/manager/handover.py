"""Planned handover (`manager run --takeover`): a new daemon process asks the running one, on its
control socket, to journal its state and stop with Shutdown `restarting` (keeping the state
directory); then it adopts that state and serves the same runtime directory.

Both sides live here: `answer` (the running daemon's side of the `handover` operation) and
`take_over` (the new process's side, before it claims the runtime directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import time
from typing import TYPE_CHECKING, Any

from .. import ffi, trace
from ..control_client import ControlClient
from ..errors import ControlError, ManagerUnavailableError, MembackingError
from ..protocol import messages as m
from ..protocol.fdpass import close_fds
from ..protocol.messages import Channel
from ..runtime import RuntimePaths
from . import fdroom, handchannel, reattach, startup
from .errors import Refused
from .fdserver import MAX_UNREGISTERED
from .journal import FORMAT_VERSION, BackingRecord, JournalError, encode
from .model import Effect, Send
from .snapshot import capture, check_fits
from .statedir import StateDirError, region_text

if TYPE_CHECKING:
    from .daemon import Daemon
    from .state import ManagerState

log = logging.getLogger("membacking.manager")

#: the control operation a new daemon sends the running one
OP = "handover"
#: what the two daemons agree on in a handover: the operation's arguments and answer, and how
#: the state moves (the state directory; from version 2 also the handover channel, see
#: handchannel.py). A daemon answers an asker of any version in HANDOVER_VERSIONS.
HANDOVER_VERSION = 2
HANDOVER_VERSIONS = (1, 2)
#: `features` bits of a version-2 ask (and of the answer: those the old daemon will use):
#: the asker listens on the handover channel for fds of memory in no file (memfd, hugetlb)
FEATURE_CHANNEL = 1
#: the asker has no state directory: the state itself comes over the channel
FEATURE_STATE = 2
#: how long a new daemon keeps asking while the running one has changes waiting on mappers
#: (longer than the default --unmap-timeout, after which such a change ends by eviction)
BUSY_WAIT = 35.0
#: pause between two asks while the running daemon is busy
BUSY_POLL = 0.05
#: how often the new process says that it still waits for a busy daemon
BUSY_SAY_EVERY = 5.0
#: how long a new daemon waits for the one that agreed to hand over to release the directory
RELEASE_WAIT = 30.0
#: where inotify is unavailable, how often that wait looks at the lock
RELEASE_POLL = 0.002
#: with inotify, the longest the wait goes without a look (a lock released without the
#: unlink, as by a daemon of an earlier release, is seen then)
RELEASE_LOOK = 0.05
#: descriptors a running daemon is taken to hold where /proc does not tell
HELD_UNKNOWN = 1024


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
        # a new daemon asks again every BUSY_POLL while busy: say so once per asking process
        asker = (args.get("pid"), exc.code)
        if exc.code != "busy" or daemon.handover_refused != asker:
            log.warning("handover refused: %s", exc)
        daemon.handover_refused = asker
        return [Send(Channel.CONTROL, identity, m.Error(exc.code, str(exc)))]
    trace.mark("handover.agreed")
    daemon.stop(f"handing over to pid {args['pid']}")
    return [Send(Channel.CONTROL, identity, m.ControlReply(result))]


def what_is_handed_over(state: ManagerState) -> tuple[list[str], int]:
    """What the handover's answer reads of the state: the changes not finished (waiting for
    acknowledgements or for their later steps), and how many regions it hands over."""
    pending = sorted({op.what for op in state.unfinished()})
    if state.awaited.deferred:  # changes that wait for mappers of the manager before to be back
        pending.append(f"{state.awaited.deferred} waiting for mappers to come back")
    if state.dropping:  # an evicted mapper may still write for a second: not handed over
        pending.append("the grace of an evicted mapper")
    return pending, sum(not r.removing for r in state.regions.values())


def _agree(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    version, journal_version, pid = args.get("version"), args.get("journal"), args.get("pid")
    features = args.get("features", 0)
    if type(version) is int and version not in HANDOVER_VERSIONS:  # (whatever else it sends)
        raise Refused(
            "version-mismatch",
            f"this manager speaks handover version {HANDOVER_VERSION}, the new one "
            f"{version}: stop this one keeping its state (`membacking manager stop "
            "--keep-state`) and start the new one instead",
        )
    keys = {"version", "journal", "pid"} | ({"features"} if version != 1 else set())
    if set(args) != keys or not all(
        type(v) is int for v in (version, journal_version, pid, features)
    ):
        raise Refused(
            "bad-request", "handover takes integers version, journal, pid (and features from 2)"
        )
    assert isinstance(version, int) and isinstance(pid, int)
    assert isinstance(journal_version, int) and isinstance(features, int)
    if journal_version < FORMAT_VERSION:
        raise Refused(
            "version-mismatch",
            f"this manager writes journal version {FORMAT_VERSION}, the new one reads up "
            f"to version {journal_version} only",
        )
    channel = bool(features & FEATURE_CHANNEL)
    listening = daemon.paths.root / handchannel.SOCKET_NAME
    if channel and not listening.is_socket():
        # agreed, this daemon would stop and then find nobody to take what it holds (the
        # asker's pid says nothing here: it may run in another pid namespace)
        raise Refused(
            "bad-request",
            f"the asker (pid {pid}) listens on no handover channel ({listening}): nothing done",
        )
    persist = daemon.persist
    if persist is None and not (channel and features & FEATURE_STATE):
        raise Refused(
            "no-state",
            "this manager runs without a state directory (--no-state): its memory lives in no "
            "file; start the new one with --no-state too (it takes the memory over the "
            "handover channel), from a release that speaks handover version 2",
        )
    if persist is not None and persist.lost():
        raise Refused(
            "state-dir",
            f"this manager's state directory {persist.dir.root} was removed under it: there is "
            "nothing to hand over (stop it; the memory ends with it and its mappers)",
        )
    if persist is not None and features & FEATURE_STATE:
        raise Refused(
            "state-dir",
            f"this manager keeps its state in {persist.dir.root}: start the new one without "
            "--no-state, on the same --state-dir",
        )
    state = daemon.state
    pending, regions = what_is_handed_over(state)
    if pending:
        raise Refused(
            "busy",
            f"changes wait for mappers' acknowledgements ({', '.join(pending)}); "
            "hand over once they are done",
        )
    volatile = daemon.store.volatile_fds()
    if volatile and not channel:
        names = sorted(
            r.name
            for r in state.regions.values()
            if any(s.mappable_id in volatile for s in r.submappings)
        )
        raise Refused(
            "volatile-memory",
            f"region(s) {', '.join(names[:10])} hold memory in no file (memfd or hugetlb), "
            "which would be lost: remove them first, or hand over to a release that speaks "
            "handover version 2",
        )
    if persist is not None:
        persist.config = dataclasses.replace(persist.config, keep=True)
    daemon.handing_over = (channel, bool(features & FEATURE_STATE))
    log.warning("handing over to pid %d (a new manager on %s)", pid, daemon.paths.root)
    answer = {
        "pid": os.getpid(),
        "instance": daemon.instance,
        "version": min(version, HANDOVER_VERSION),
        "journal": FORMAT_VERSION,
        "regions": regions,
    }
    if version >= 2:
        answer["features"] = features & (FEATURE_CHANNEL | FEATURE_STATE)
    return answer


def send_over(daemon: Daemon) -> None:
    """At the end of a shutdown that hands over on the channel: send the new daemon the state
    (if it has no state directory) and every fd of memory in no file. Logged if it fails (the
    mappers keep that memory mapped; the new daemon cannot serve it)."""
    assert daemon.handing_over is not None
    _, with_state = daemon.handing_over
    state = b""
    if with_state:
        state_id = daemon.state.state_id
        snapshot = capture(daemon.state, daemon.store, state_id, str(daemon.paths.root))
        state = encode(snapshot)
    fds = daemon.store.volatile_fds()
    try:
        handchannel.send(daemon.paths, state, fds, RELEASE_WAIT)
    except OSError as exc:
        log.error(
            "cannot send %d fds%s to the new manager: %s",
            len(fds),
            " and the state" if with_state else "",
            exc.strerror or exc,
        )


# ---- the new daemon's side -------------------------------------------------------------------


def precheck(daemon: Daemon) -> bool:
    """Refuse, before the running daemon is asked, a state this one could not adopt (another
    address space, an initial region that differs): the running daemon would be gone and this
    one refuse to start. HandoverError if so. Without the service manager's fd store, the
    state is adopted here already, as it stands (`Persistence.prepare`): returns True then.
    Without a state directory there is nothing to read: the state comes over the channel."""
    persist = daemon.persist
    if persist is None:
        _check_running(daemon)
        return False
    prepare = daemon.fdstore is None
    try:
        snapshot = persist.prepare(daemon.state, daemon.store) if prepare else persist.dir.read()
        if snapshot is None:
            named = persist.noted_state_dir()
            if named is not None and named != persist.dir.root and named.is_dir():
                raise HandoverError(
                    f"nothing to take over in {persist.dir.root}: the running manager keeps "
                    f"its state in {named}; take over with --state-dir {named}"
                )
            raise HandoverError(
                f"nothing to take over: no state in {persist.dir.root} (the running manager "
                "keeps none there: it runs with --no-state or another --state-dir, or its "
                "state directory was removed under it)"
            )
        check_fits(snapshot, str(daemon.paths.root), daemon.config.address_space)
    except (JournalError, StateDirError) as exc:
        raise HandoverError(f"cannot take over the state in {persist.dir.root}: {exc}") from None
    _check_regions(
        daemon,
        {r.name: (r.gpa, r.size, not r.writable, r.backing, r.path) for r in snapshot.regions},
    )
    return prepare and persist.prepared


Described = tuple[int | None, int, bool, str, str | None]


def _check_running(daemon: Daemon) -> None:
    """A running daemon without a state directory sends its state over the channel only once
    it agreed, and is gone then: its address space (`status`, from this release on) and its
    regions (their listing) are checked before it is asked."""
    client = ControlClient(daemon.paths.root, timeout=10.0)
    try:
        space = client.status().get("address_space")
        listed = client.regions()
    except MembackingError as exc:
        raise _unavailable(daemon.paths, exc) from None
    finally:
        client.close()
    if isinstance(space, int) and space != daemon.config.address_space:
        raise HandoverError(
            f"the running manager serves an address space of {space:#x} bytes, this one "
            f"{daemon.config.address_space:#x}; nothing was changed (start the new manager "
            "with the same --address-space)"
        )
    _check_regions(
        daemon,
        {
            r["name"]: (r["gpa"], r["size"], not r["writable"], r["backing"], r["path"])
            for r in listed
        },
    )


def _check_regions(daemon: Daemon, have: dict[str, Described]) -> None:
    """HandoverError if an initial region (--region, config) differs from the running one's."""
    for spec in daemon.config.regions:
        have_it = have.get(spec.name)
        want = (spec.gpa, spec.size, spec.readonly, spec.backing, spec.file)
        # (where it is placed is the running daemon's, as in adopted_region)
        if have_it is not None and have_it[1:] != want[1:]:
            ram = daemon.store.ram_kind  # (the running manager's too: --no-state goes alike)
            have_text, want_text = region_text(*have_it, ram=ram), region_text(*want, ram=ram)
            raise HandoverError(
                f"region {spec.name!r} of the running manager is {have_text}, but "
                f"--region/config asks for {want_text}; nothing was changed (start "
                "the new manager without that region in --region/config to take it as it is)"
            )


@dataclasses.dataclass
class Takeover:
    """What a new daemon got from the one that handed over."""

    #: the state was adopted before the ask (`Persistence.prepare`)
    prepared: bool
    #: the old daemon's answer
    answer: dict[str, Any]
    #: the state's journal encoding, sent over the channel (empty: in the state directory)
    state: bytes = b""
    #: fds of memory in no file, by mappable id (each taken by `inherit`, the rest closed)
    fds: dict[int, int] = dataclasses.field(default_factory=dict)

    def inherit(self, record: BackingRecord) -> int | None:
        """The fd the old daemon sent for a journaled memfd/hugetlb backing, if it is that
        very memory (same inode, large enough); None (it comes back zeroed, logged) if not."""
        fd = self.fds.pop(record.mappable_id, None)
        if fd is None:
            return None
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (record.dev, record.ino) or info.st_size < record.size:
            os.close(fd)
            return None
        return fd

    def close(self) -> None:
        """Close the fds no backing took."""
        close_fds(list(self.fds.values()))
        self.fds.clear()


def take_over(daemon: Daemon, timeout: float = 10.0) -> Takeover:
    """Ask the daemon serving `daemon`'s runtime directory to hand over, take what it sends
    on the channel, and wait until it has released the directory. HandoverError if it cannot
    (it keeps serving then, unless it failed after it agreed)."""
    paths = daemon.paths
    if paths.manager_running() is False:
        raise HandoverError(
            f"nothing to take over: no membacking manager at {paths.root}; start without "
            "--takeover to serve it (the state a manager that died left is adopted then)"
        )
    trace.mark("takeover.prepare")
    running = _holder(paths)
    startup.check_metrics_port(daemon, running)
    prepared = precheck(daemon)
    if prepared:
        # the full collection of the state prepared, while the running daemon still serves
        reattach.warm(daemon.state)
        daemon.heap.settle(daemon._size())
        daemon.settled_early = daemon.state
        trace.mark("takeover.settled")
    # the fds it sends, and its mappers' connections, come in the gap: room for as many as the
    # running daemon holds is made now, not by growing the table as they come
    held = fdroom.open_count(running) or HELD_UNKNOWN
    fdroom.make_room(held + fdroom.PER_MAPPER * MAX_UNREGISTERED, daemon._fd_ceiling)
    features = FEATURE_CHANNEL | (FEATURE_STATE if daemon.persist is None else 0)
    args = {"version": HANDOVER_VERSION, "journal": FORMAT_VERSION, "pid": os.getpid()}
    try:
        receiver = handchannel.Receiver(paths)
    except handchannel.ChannelError as exc:
        raise HandoverError(str(exc)) from None
    try:
        trace.mark("takeover.ask")
        result = _ask(paths, timeout, {**args, "features": features}, daemon.persist is None)
        trace.mark("takeover.agreed")
        taken = Takeover(prepared, result)
        if result.get("features", 0) & FEATURE_CHANNEL:
            taken.state, taken.fds = receiver.receive(RELEASE_WAIT)
            trace.mark("takeover.received")
    except handchannel.ChannelError as exc:
        raise HandoverError(f"the manager agreed to hand over, but {exc}") from None
    finally:
        receiver.close()
    try:
        _await_release(paths, result["pid"])
    except BaseException:
        taken.close()
        raise
    trace.mark("takeover.released")
    return taken


def _ask(paths: RuntimePaths, timeout: float, args: dict[str, Any], needs_2: bool) -> Any:
    """Ask until the running daemon agrees (or refuses for good: HandoverError). A daemon of
    an earlier release (handover version 1) is asked again as one, unless `needs_2`."""
    client = ControlClient(paths.root, timeout=timeout)
    started = time.monotonic()
    deadline, said = started + BUSY_WAIT, -BUSY_SAY_EVERY
    first: ControlError | None = None  # the refusal of the version-2 ask, once asked as 1
    try:
        while True:
            try:
                return client.call(OP, **args)
            except ControlError as exc:
                now = time.monotonic()
                if exc.code == "busy" and now < deadline:
                    if now - said >= BUSY_SAY_EVERY:  # a wait the operator can see, and why
                        said = now
                        log.warning(
                            "the running manager is busy (%s); asking again until it is done "
                            "(%.0f of at most %.0f s waited)",
                            exc,
                            now - started,
                            BUSY_WAIT,
                        )
                    time.sleep(BUSY_POLL)
                    continue
                # a daemon of handover version 1 refuses a version-2 ask with one of these
                # codes (PROTOCOL.md §14.1), whatever its words; a daemon of version 2 that
                # refuses for another reason refuses the version-1 ask too, and says why then
                older = exc.code in ("version-mismatch", "bad-request")
                if older and args["version"] == 2 and not needs_2:
                    args = {k: v for k, v in args.items() if k != "features"} | {"version": 1}
                    first = exc  # if the version-1 ask is refused too, this says why
                    continue
                if first is not None and exc.code != "busy":
                    exc = first
                if exc.code == "bad-request" and repr(OP) in str(exc):
                    raise HandoverError(
                        f"the manager at {paths.root} does not know how to hand over (an older "
                        "release): stop it keeping its state (SIGTERM, if it runs with "
                        "--keep-state) and start this one instead"
                    ) from None
                raise HandoverError(
                    f"the manager at {paths.root} refuses to hand over: {exc}"
                ) from None
            except ManagerUnavailableError as exc:
                raise _unavailable(paths, exc) from None
    finally:
        client.close()


def _unavailable(paths: RuntimePaths, exc: MembackingError) -> HandoverError:
    """Why the running daemon could not be asked: none runs, or one holds the directory and
    does not answer (stopped, hung), which is not "nothing to take over"."""
    if isinstance(exc, ControlError) or paths.manager_running() is False:
        return HandoverError(f"nothing to take over: {exc}")
    return HandoverError(
        f"the manager running at {paths.root} does not answer ({exc}): it is stopped (SIGSTOP) "
        "or busy past the timeout; nothing was taken over: try again once it answers"
    )


def _holder(paths: RuntimePaths) -> int:
    """The pid the runtime directory's lock names (0 if it names none)."""
    try:
        return int(paths.lock.read_bytes().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _await_release(paths: RuntimePaths, pid: int) -> None:
    """Wait until the daemon that agreed has released the runtime directory's lock. It unlinks
    the lock as it releases it: an inotify watch of the directory's deletions wakes this wait
    then, instead of a look at the lock every few milliseconds (short sleeps where inotify is
    unavailable)."""
    deadline = time.monotonic() + RELEASE_WAIT
    try:
        watch: int | None = ffi.watch_directory(os.fspath(paths.root), ffi.IN_DELETE)
    except OSError:
        watch = None
    try:
        poll = select.poll()
        if watch is not None:
            poll.register(watch, select.POLLIN)
        while paths.manager_running() is not False:  # looked at after the watch is set
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandoverError(
                    f"the manager (pid {pid}) agreed to hand over but still holds {paths.root} "
                    f"after {RELEASE_WAIT:g}s"
                )
            if watch is None:
                time.sleep(min(left, RELEASE_POLL))
            elif poll.poll(min(left, RELEASE_LOOK) * 1000):
                with contextlib.suppress(BlockingIOError):
                    while os.read(watch, 4096):  # which file went tells nothing more
                        pass
    finally:
        if watch is not None:
            os.close(watch)
