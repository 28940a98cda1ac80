"""A mapper riding through a manager restart: when its connection is lost (or the manager said
Shutdown "restarting"), it keeps every mapping, registers again with the manager that comes back
on its runtime directory (with backoff, for at most its reconnect timeout), and tells it what it
still holds (Holdings), which that manager checks against its table, then calls the hooks its
owner set (e.g. to pin again what it lent). Runs on the mapper thread.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import zmq

from .. import trace
from ..errors import ArgumentTypeError, ManagerUnavailableError
from ..protocol import messages as m
from ..protocol.holdings import holdings_messages, packed_messages
from .sockwatch import SocketWatch
from .waitlist import RELINK

if TYPE_CHECKING:
    from .core import VaMapper
    from .link import ManagerLink

log = logging.getLogger("membacking.mapper")

#: first and largest pause between two tries to register again
BACKOFF_START, BACKOFF_MAX = 0.05, 1.0
#: the longest a pause between two tries waits at a time for a new fd socket (sockwatch.py
#: wakes it as soon as a successor binds one): it renews the lease and notices a close between
SOCKET_WATCH = 0.05
#: how long a Shutdown may lag behind the hang-up of the fd socket
SHUTDOWN_GRACE = 0.25
#: how long a manager that said Shutdown "restarting" has to close the old connection
OLD_CONNECTION_GRACE = 2.0
#: why a mapper that does not follow a fresh start (attach(fresh_start="follow")) is gone
FRESH_START = (
    "the manager came back serving other memory (started with --no-state or --fresh): the "
    "guest memory this mapper used is gone; attach again to use the new memory"
)
NOT_TOLD = (
    "the manager that came back does not say which memory it serves (it does not speak "
    "REATTACH: an earlier release), so none of what this mapper held can be kept; attach again"
)


def add_hook(mapper: VaMapper, hook: Callable[[bool, int], None]) -> None:
    """Have `hook(kept, old_mapper_id)` called each time the mapper registered again;
    ArgumentTypeError now for one that is not callable (it raised at the next restart, with a
    traceback on stderr)."""
    if not callable(hook):
        raise ArgumentTypeError(f"hook must be callable, got {hook!r}")
    mapper.relink_hooks.append(hook)


class Relink(Exception):
    """A fault's request went to a manager that is gone: ask its successor."""


def start_relink(mapper: VaMapper, reason: str, announced: bool = False) -> bool:
    """The connection is lost: unless the mapper cannot wait for a successor (no reconnect
    timeout, gone, closing), make faults wait while the mapper thread registers again. True if
    it will. `announced`: called for the manager's Shutdown (`restarting`), which has decided
    already: its grace for a Shutdown behind the hang-up is not waited (it held every fault of
    a handover for SHUTDOWN_GRACE)."""
    if mapper.gone is not None or mapper.reconnect_timeout <= 0 or mapper._stop:
        return False
    if mapper.relinked.is_set() and not announced:
        # The manager's Shutdown may be on its way behind the hang-up (it travels on the
        # stream, through ZeroMQ's I/O threads): it says whether to wait for a successor.
        with contextlib.suppress(zmq.ZMQError):
            if mapper.link.stream.poll(int(SHUTDOWN_GRACE * 1000)):
                mapper._drain_stream()
        if mapper.gone is not None or not mapper.relinked.is_set():
            return True  # the Shutdown decided
    if mapper.relinked.is_set():
        log.warning("mapper %d: %s; waiting for the manager to come back", mapper.id, reason)
        mapper.relink_reason = reason
        mapper.relink_announced = announced
        mapper.relinked.clear()
        mapper.waiters.fail_all(RELINK)  # their requests went to the manager that is gone
    return True


#: how long a fault whose request could not be sent waits for the mapper thread to notice
RELINK_NOTICE = 2.0


def relink_coming(mapper: VaMapper, sent_as: int) -> bool:
    """The fd socket failed under a fault sent as mapper `sent_as`: whether the mapper thread
    is about to register again (it notices the hang-up within a moment), or already has (the
    mapper's id changed: the fault must not wait out RELINK_NOTICE then), so the fault should
    be asked again."""
    if mapper.reconnect_timeout <= 0:
        return False
    deadline = time.monotonic() + RELINK_NOTICE
    while (
        mapper.relinked.is_set()
        and mapper.id == sent_as
        and mapper.gone is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    return not mapper.relinked.is_set() or (mapper.gone is None and not mapper.closed)


def _forget_acks(mapper: VaMapper) -> None:
    """Registered again: acks owed to the dead manager are owed to nobody."""
    mapper.acks.waiting.clear()
    mapper._pending_unmaps = [(-1, rng, rel) for _, rng, rel in mapper._pending_unmaps]


def _drop_everything(mapper: VaMapper) -> int:
    """The manager serves other memory now: unmap what no view pins, close every fd. Returns
    how many mappings were dropped."""
    dropped = 0
    with mapper.lock:
        for rng, _ in list(mapper.chunks.items()):
            if not mapper._pinned(rng):
                mapper._remove_chunks(rng)
                mapper.reservation.unmap(rng.start, rng.len)
                dropped += 1
    mapper.fds.close_all()
    return dropped


def _await_hangup(mapper: VaMapper) -> None:
    """Let a manager that announced its restart close the old connection first: a daemon
    still shutting down would never answer a new Hello."""
    with contextlib.suppress(OSError, ValueError):
        poll = select.poll()
        poll.register(mapper.link.fd_sock, select.POLLHUP | select.POLLRDHUP)
        poll.poll(OLD_CONNECTION_GRACE * 1000)


def _socket_identity(mapper: VaMapper) -> tuple[int, int, int] | None:
    return mapper.link.socket_identity()


def relink(mapper: VaMapper) -> bool:
    """Register again and restore what is held; False (and the mapper gone) if no manager
    took it within the reconnect timeout or the mapper is closing."""
    trace.mark(f"mapper.relink old={mapper.id}")
    deadline = time.monotonic() + mapper.reconnect_timeout
    old_state = mapper.link.state_id
    old_id = mapper.id
    _await_hangup(mapper)
    mapper.link.drop_connection()
    trace.mark(f"mapper.hangup old={old_id}")
    started = time.monotonic()
    # A manager that said `restarting` is going: until its successor binds a new fd.sock, a
    # try can only fail (and costs CPU just when the old manager finishes and the new starts).
    # Only the socket is watched then, for BACKOFF_MAX at most (then tries go on as usual).
    watch_only = started + BACKOFF_MAX if mapper.relink_announced else started
    watch = mapper.link.socket_watch()
    return _register_again(mapper, watch, (started, deadline, watch_only), old_state, old_id)


@contextlib.contextmanager
def _capped(link: ManagerLink, left: float) -> Iterator[None]:
    """One try to register again, its waits (Hello, Attach) cut to what is `left` of the
    reconnect timeout: a manager that takes the connection but never answers must not keep the
    mapper past it."""
    timeout = link.timeout
    link.timeout = max(0.1, min(timeout, left))
    try:
        yield
    finally:
        link.timeout = timeout


def _register_again(
    mapper: VaMapper,
    watch: SocketWatch,
    times: tuple[float, float, float],
    old_state: bytes | None,
    old_id: int,
) -> bool:
    """relink's tries: (when it began, its deadline, until when a new fd.sock alone is waited
    for)."""
    started, deadline, watch_only = times
    delay = BACKOFF_START
    last = "no manager answered"
    while not mapper._stop:
        tried = _socket_identity(mapper)  # before the try: one bound during it counts
        watching = tried in (mapper.link.registered_socket, None) and time.monotonic() < watch_only
        if not watching:
            try:
                # with PackedHoldings, what it holds goes right behind the Attach, not after
                # its answer: one round trip less for each mapper (peers.py takes it)
                with _capped(mapper.link, deadline - time.monotonic()):
                    restored = mapper.link.reconnect(lambda: _restore(mapper, old_state, old_id))
                trace.mark(f"mapper.welcome old={old_id} new={mapper.link.mapper_id}")
                if not restored:
                    _restore(mapper, old_state, old_id)
                trace.mark(f"mapper.restored old={old_id}")
                break
            except (ManagerUnavailableError, OSError, TimeoutError) as exc:  # not yet: try again
                last = str(exc)
                trace.mark(f"mapper.try-failed old={old_id}")
        # Mapped memory stays in use meanwhile: this thread vouches for the mapper's lease
        # while it is alive and trying (no manager can evict a mapper that is not registered).
        mapper.lease.end_turn(time.monotonic(), renew=mapper.dropped is None)
        left = deadline - time.monotonic()
        if left <= 0:
            mapper.gone_for_good(
                f"{mapper.relink_reason}; no manager took this mapper back within "
                f"{mapper.reconnect_timeout:g}s ({last})"
            )
            return False
        pause_end = time.monotonic() + min(delay, left)
        while (rest := pause_end - time.monotonic()) > 0 and not mapper._stop:
            watch.wait(min(rest, SOCKET_WATCH))
            mapper.lease.end_turn(time.monotonic(), renew=mapper.dropped is None)
            if _socket_identity(mapper) not in (tried, None):
                trace.mark(f"mapper.socket-seen old={old_id}")
                break  # a manager has just bound a new fd socket: try it now
        if not watching:
            delay = min(delay * 2, BACKOFF_MAX)
    else:
        return False
    if old_state is not None and mapper.link.state_id != old_state and not mapper.follow_fresh:
        # its guest memory is gone: told at its next access, not served other memory unasked
        mapper.link.drop_connection()  # (its registration with that manager ends)
        mapper.gone_for_good(FRESH_START if mapper.link.state_id is not None else NOT_TOLD)
        return False
    log.warning(
        "mapper %d (was %d): registered again after %.3fs",
        mapper.id,
        old_id,
        time.monotonic() - started,
    )
    # the new manager knows it as lazy: ask for the replay again, also when the manager that
    # is gone had not finished it (the upgrade that waits for its EagerResult gets this one's)
    if mapper.eager or not mapper._eager_done.is_set():
        mapper.eager = False
        mapper.post(m.SetEager())
    mapper.relinked.set()  # faults waiting for it go on
    kept = old_state is not None and mapper.link.state_id == old_state
    for hook in list(mapper.relink_hooks):
        try:
            hook(kept, old_id)
        except Exception:  # a hook's bug must not stop the mapper thread
            log.exception("mapper %d: a hook on registering again failed", mapper.id)
    return True


def _restore(mapper: VaMapper, old_state: bytes | None, old_id: int) -> None:
    """Registered with a new manager: keep what it still serves, drop the rest."""
    mapper.id = mapper.fds.id = mapper.acks.id = mapper.link.mapper_id
    mapper.fds.lost = None  # a new fd socket
    _forget_acks(mapper)
    if old_state is not None and mapper.link.state_id == old_state:
        # Unmaps of the dead manager that open views deferred are not applied: the Holdings
        # tell the new manager of those mappings, and it decides (an Unmap of its own if they
        # are gone). Applied once the views closed, they dropped a mapping and an fd the new
        # manager counted as held: every later fault of it failed for want of the fd.
        mapper._pending_unmaps.clear()
        _send_holdings(mapper)
        return
    if old_state is not None and not mapper.follow_fresh:
        return  # it does not go on with other memory: gone for good (_register_again)
    dropped = _drop_everything(mapper)
    if dropped or old_state is not None:  # (without REATTACH it dropped them at the hang-up)
        log.warning(
            "mapper %d (was %d): the manager serves other memory now (a fresh start): dropped "
            "%d mappings and every fd",
            mapper.id,
            old_id,
            dropped,
        )


def _send_holdings(mapper: VaMapper) -> None:
    # each fd and chunk was packed when it arrived: no fstat and no pack per entry here
    if mapper.link.features & m.FEATURE_PACKED_HOLDINGS:
        fds = mapper.fds.packed_identities()
        with mapper.lock:
            maps = mapper.chunks.packed()
        msgs: list[m.Holdings | m.PackedHoldings] = list(packed_messages(fds, maps))
    else:
        with mapper.lock:
            mappings = [
                x
                for rng, chunk in mapper.chunks.items()
                for x in (
                    rng.start,
                    rng.end - rng.start,
                    chunk.mappable_id,
                    chunk.file_offset,
                    int(chunk.writable),
                )
            ]
        msgs = holdings_messages(mapper.fds.identities(), mappings, packed=False)
    if msgs[-1].fds or msgs[-1].mappings:  # an empty one ends them: the manager knows
        packed = isinstance(msgs[-1], m.PackedHoldings)  # it has heard all the mapper holds
        msgs.append(m.PackedHoldings(b"", b"") if packed else m.Holdings((), ()))
    for msg in msgs:
        mapper.link.send(msg)
