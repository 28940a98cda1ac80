"""A child forked from a mapper's process is no mapper: the manager's removals never reach it and
the mapper thread did not survive the fork. So, right after the fork, the child drops every
mapping and fd it inherited, and every access through the inherited GuestMemory raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ..errors import DetachedError
from ..ffi import PAGE_SIZE

if TYPE_CHECKING:
    from .core import VaMapper

log = logging.getLogger("membacking.mapper")

#: every mapper of this process that may hold guest memory, with the pid of the process that
#: attached it (a weak table: a mapper closed and let go leaves it by itself)
_attached: weakref.WeakKeyDictionary[VaMapper, int] = weakref.WeakKeyDictionary()
_registered = False


def track(mapper: VaMapper) -> None:
    """Note a new mapper of this process, so that a child forked from it disowns the mapper."""
    global _registered
    if not _registered:  # once per process: a forked child inherits the registration
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _registered = True
    _attached[mapper] = os.getpid()


#: the locks `_before_fork` took, by forking thread, released in the parent once its fork is
#: done (two threads may fork at once: each releases only its own)
_taken: dict[int, list[threading.Lock]] = {}


def _before_fork() -> None:
    """os.register_at_fork's hook, in the forking thread: waits for each mapper's fd receive in
    progress, so that every fd a child inherits is one its table names and closes
    (`MapperFds.fork_lock`)."""
    taken = _taken.setdefault(threading.get_ident(), [])
    for mapper in list(_attached):
        lock = mapper.fds.fork_lock
        lock.acquire()
        taken.append(lock)


def _after_fork_in_parent() -> None:
    for lock in reversed(_taken.pop(threading.get_ident(), [])):
        lock.release()


def check(mapper: VaMapper, gpa: int | None = None) -> None:
    """DetachedError if this process was forked from the one that attached `mapper`."""
    if mapper.forked is not None:
        raise DetachedError(mapper.forked, gpa)


def _after_fork_in_child() -> None:
    """os.register_at_fork's hook: runs in the child before fork() returns there, with one
    thread alive (the one that forked); the parent is not affected."""
    _taken.clear()  # each reset with its table (MapperFds.close_after_fork)
    inherited = list(_attached.items())
    _attached.clear()  # none of them is this process's (a later attach here is)
    for mapper, owner in inherited:
        try:
            disown(mapper, owner)
        except Exception:  # its accesses raise anyway; the child itself must go on
            log.exception("mapper %d: dropping what a forked child inherited failed", mapper.id)


def disown(mapper: VaMapper, owner: int) -> None:
    """Leave `mapper`, inherited from process `owner`, unusable and holding nothing: accesses
    raise DetachedError at once, no guest memory or file of it stays mapped, its fds and its fd
    socket are closed. Its ZeroMQ sockets are left alone (undefined after a fork; pyzmq closes
    none of them in a process other than the one that made them)."""
    mapper.forked = (
        f"this process (pid {os.getpid()}) was forked from process {owner}, which attached this "
        f"GuestMemory (mapper {mapper.id}); a forked child shares none of its mappings: attach "
        "again in the child (membacking.attach)"
    )
    # first: the fast paths read `hot` without the lock; neither chunk nor lease is valid now
    mapper.hot[0:4] = 0, 0, False, 0.0
    reinit = getattr(mapper.lock, "_at_fork_reinit", None)  # held by a thread of the parent?
    if reinit is not None:
        reinit()
    relinked = threading.Event()  # a fault must not wait for a relink that never comes
    relinked.set()
    mapper.relinked = relinked
    if mapper.gone is None:
        mapper.gone = mapper.forked
    # where a view made before the fork may point: mapped chunks, ranges whose Unmap waits for
    # a view, and the views' own ranges (a view kept open past detach())
    try:
        spans = [(r.start, r.end) for r, _ in mapper.chunks.items()]
        spans += [(r.start, r.end) for _, r, _ in mapper._pending_unmaps]
        spans += [(start, end) for start, end, _ in mapper.views.open.values()]
    except Exception:  # a table caught in the middle of a change: guest memory goes anyway
        log.exception("mapper %d: no view made before the fork is kept readable", mapper.id)
        spans = []
    mapper.chunks.clear()
    mapper._pending_unmaps.clear()
    mapper.reservation.after_fork(_pages(spans))
    mapper.fds.close_after_fork()  # (a fork in the middle of close() finds some still held)
    if mapper.closed:
        return  # its sockets and pipe were closed before the fork
    wake = (mapper._wake_r, mapper._wake_w)
    mapper._wake_r = mapper._wake_w = -1  # a write to -1 fails (a reused number would not)
    for fd in wake:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        fd_sock = mapper.link.fd_sock.detach()  # the object forgets it: no second close
        if fd_sock >= 0:
            os.close(fd_sock)
    watch = mapper.link._watch
    if watch is not None:
        watch.close()


def _pages(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` widened to whole pages and merged: (offset, size), ascending."""
    out: list[list[int]] = []
    for start, end in sorted((s - s % PAGE_SIZE, -(-e // PAGE_SIZE) * PAGE_SIZE) for s, e in spans):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, end - start) for start, end in out]
