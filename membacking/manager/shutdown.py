"""How a daemon stops: it takes no new connection, tells its mappers (Shutdown on the stream and
the fd socket, then the end of the fd socket), closes its state (journal, fd store) and, in a
handover, sends its successor what the state directory does not hold; then it closes the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from .. import trace
from ..protocol import messages as m
from . import handover, sdnotify

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("membacking.manager")

#: Seconds a stopping daemon that had mappers waits after telling them (and closing their fd
#: sockets) before it exits: longer than a mapper's lease (membacking.mapper.lease.LEASE), so
#: once the daemon is gone no mapper can access its old mappings before it has dropped them.
STOP_LINGER = 0.6


def stop_keeping(daemon: Daemon, args: object) -> None:
    """The `stop` agreed with `args` (control.py): one asked to keep (`keep_state` true) or
    end (false) the state does so whatever `--keep-state` said (`manager stop --keep-state`)."""
    keep = args.get("keep_state") if isinstance(args, dict) else None
    if type(keep) is not bool:
        return
    if daemon.persist is not None:
        daemon.persist.config = dataclasses.replace(daemon.persist.config, keep=keep)
    daemon.state.persistence["keep_state"] = keep


def shut_down(daemon: Daemon) -> None:
    """Stop `daemon` (its loop has ended). Restarting (a handover, or a state kept for the next
    daemon), the mappers are told last: they keep their memory meanwhile, and the daemon's own
    remaining work is not slowed by every mapper waking at once on a machine of few cores
    (it took 10 ms of the handover's gap, for 1 ms of CPU). Stopping for good, they are told
    first and given STOP_LINGER to drop their mappings."""
    reason = daemon._stop_reason or "stopped"
    log.info("shutting down: %s", reason)
    trace.mark("daemon.shutdown")
    sdnotify.notify("STOPPING=1")
    # the state directory's own setting (a handover turns it on), else the configured one
    keep = daemon.handing_over is not None or (
        daemon.persist.config.keep
        if daemon.persist is not None
        else bool(daemon.state.persistence["keep_state"]) and daemon.fdstore is not None
    )
    if (
        keep
        and daemon.handing_over is None
        and daemon.persist is not None
        and daemon.persist.lost()
    ):
        # removed under the daemon: no next daemon can adopt it, so this stop is for good
        log.warning("the state directory was removed: mappers are told the manager stops")
        keep = False
    # No new connection is taken from now on: a mapper told to register again then finds no
    # listener (and waits for the next daemon's socket), rather than a backlog that is never
    # answered
    with contextlib.suppress(OSError):
        daemon._listen.close()
    if keep:
        _close_state(daemon, keep)
        _tell_mappers(daemon, reason, m.SHUTDOWN_RESTARTING)
    else:
        _tell_mappers(daemon, reason, m.SHUTDOWN_STOPPING)
        _close_state(daemon, keep)
    daemon._close_all()
    trace.mark("daemon.released")


def _tell_mappers(daemon: Daemon, reason: str, code: str) -> None:
    with contextlib.suppress(Exception):
        attached = bool(daemon.state.mappers)
        daemon._apply(daemon.state.shutdown(reason, code))
        for conn in list(daemon._conns.values()):
            daemon._say_farewell(conn, reason, code)
            conn.close()  # the end of the fd socket wakes each mapper at once
        if attached and code != m.SHUTDOWN_RESTARTING:
            time.sleep(STOP_LINGER)
    trace.mark("daemon.told")


def _close_state(daemon: Daemon, keep: bool) -> None:
    if daemon._journal_due:
        daemon._save_state()
    if daemon.fdstore is not None:
        daemon.fdstore.stop(keep)
    if daemon.persist is not None:
        try:
            daemon.persist.close(daemon.state, daemon.store, clean=True)
        except Exception:
            log.exception("could not close the state directory")
    trace.mark("daemon.journaled")
    if daemon.handing_over is not None and daemon.handing_over[0]:
        handover.send_over(daemon)
