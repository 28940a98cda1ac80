"""How a starting daemon comes by its state: taken over from the daemon it replaces (adopted
before the ask, or sent on the handover channel), else adopted from the service manager's fd
store or the state directory, else fresh; then its initial regions (--region, config).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import socket
from typing import TYPE_CHECKING

import psutil

from ..errors import MembackingError
from . import handover
from .errors import Refused
from .journal import JournalError, decode
from .persist import adopted_region, describe
from .procinfo import metrics_url
from .rundir import RuntimeDirError
from .snapshot import check_fits, restore
from .statedir import StateDirError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("membacking.manager")


def take_over(daemon: Daemon) -> handover.Takeover | None:
    """With --takeover: what the daemon serving the runtime directory handed over (its fds
    are given to the store when it adopts); None without. HandoverError if it did not."""
    if not daemon.config.takeover:
        return None
    try:
        taken = handover.take_over(daemon)
    except BaseException:
        daemon.store.close_all()  # what was prepared
        raise
    daemon.handed_over = taken.answer
    daemon.store.inherited = taken.inherit
    return taken


def drop(daemon: Daemon, taken: handover.Takeover | None) -> None:
    """Close the fds handed over that no backing took."""
    if taken is not None:
        taken.close()
        daemon.store.inherited = None


def failed(daemon: Daemon, taken: handover.Takeover | None) -> None:
    """A start that failed: `drop`, and have the runtime directory's release remove the
    directories the start created (those still empty)."""
    daemon._lock.discard_created = True
    drop(daemon, taken)


def serve_metrics(daemon: Daemon) -> None:
    """Serve the metrics (--metrics-port), the start's last step; RuntimeDirError if the
    port cannot be had (the start then fails like any other, `failed`)."""
    config = daemon.config
    if config.metrics_port is None:
        return
    from .metrics import ManagerMetrics  # prometheus-client: loaded only to serve them

    daemon.metrics = ManagerMetrics(daemon.state)
    try:
        daemon.metrics_port = daemon.metrics.serve(config.metrics_port, config.metrics_addr)
    except OSError as exc:
        where = f"{config.metrics_addr}:{config.metrics_port}"
        raise RuntimeDirError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    daemon.state.metrics_url = metrics_url(config.metrics_addr, daemon.metrics_port)


def adopt(daemon: Daemon, taken: handover.Takeover | None) -> None:
    """Fill the daemon's empty state (the runtime directory is claimed), then add the
    initial regions the state does not have (one it has must be as configured). A start
    refused here leaves no runtime directory it created (`failed`)."""
    persist, fdstore = daemon.persist, daemon.fdstore
    if fdstore is not None:  # adopts through the state directory if there is one
        fdstore.open(daemon.state, daemon.store, persist, daemon.config.persist.fresh)
    elif taken is not None and persist is None:
        _adopt_sent(daemon, taken.state)
    elif persist is not None and taken is not None and taken.prepared:
        if not persist.open_prepared(daemon.state, daemon.store):
            daemon.store.close_all()
            daemon.store, daemon.state = daemon._empty_state()
            daemon.store.fd_ceiling = daemon._fd_ceiling
            daemon.store.inherited = taken.inherit
            persist.adopt(daemon.state, daemon.store)
    elif persist is not None:
        persist.open(daemon.state, daemon.store)
    drop(daemon, taken)
    daemon.state.state_id = (
        persist.state_id
        if persist is not None
        else fdstore.state_id
        if fdstore is not None
        else daemon.state.state_id or secrets.token_bytes(16)
    )
    daemon.state.persistence = describe(persist, daemon.config.persist, fdstore is not None)
    adopted_from = (
        f"the state in {persist.dir.root}"
        if persist is not None
        else "the state in the service manager's fd store"
        if fdstore is not None
        else "the state handed over"
    )
    daemon.state.held_lines = []  # logged once the whole start succeeded (log_held)
    for spec in daemon.config.regions:
        want = (spec.gpa, spec.size, spec.readonly, spec.backing, spec.file)
        try:
            if adopted_region(daemon.state, spec.name, want, adopted_from):
                continue
            daemon.state.add_region(
                spec.name,
                spec.gpa,
                spec.size,
                not spec.readonly,
                priority=spec.priority,
                enabled=not spec.disabled,
                backing=spec.backing,
                path=spec.file,
            )
        except (MembackingError, Refused) as exc:
            if taken is None:
                raise
            # The daemon that handed over is gone: refusing to start now would leave no one
            # serving its memory (precheck refused what it could see before the ask).
            log.error("--region/config %s not applied after the handover: %s", spec.name, exc)
    limit, held = daemon.config.limits.max_regions, len(daemon.state.regions)
    if held > limit:  # kept: the limit bounds growth, and refusing would strand the memory
        log.warning(
            "%s holds %d regions, more than its limit of %d (%s): every one is kept, and no "
            "region can be added until %d are removed (or start with that limit at %d or more "
            "to add one)",
            adopted_from,
            held,
            limit,
            daemon.config.limits.origin("max_regions"),
            held - limit + 1,
            held + 1,
        )


def log_held(daemon: Daemon) -> None:
    """The start succeeded: log the initial regions it added (held until now, so that a
    start refused after some were made does not claim them: it made nothing)."""
    lines, daemon.state.held_lines = daemon.state.held_lines or [], None
    for line in lines:
        log.info(*line)


def _adopt_sent(daemon: Daemon, data: bytes) -> None:
    """Adopt the state the old daemon sent on the handover channel (a daemon without a state
    directory), its memory from the fds that came with it. StateDirError if it does not fit."""
    try:
        snapshot = decode(data)
        check_fits(snapshot, str(daemon.paths.root), daemon.state.address_space)
    except (JournalError, StateDirError) as exc:
        raise StateDirError(f"the state handed over cannot be used: {exc}") from None
    for warning in restore(snapshot, daemon.state, daemon.store):
        log.error("state handed over: %s", warning)
    daemon.state.state_id = snapshot.state_id
    log.info(
        "adopted the state handed over: %d regions, %d backings",
        len(snapshot.regions),
        len(snapshot.backings),
    )


def check_metrics_port(daemon: Daemon, running: int) -> None:
    """HandoverError, before the running daemon is asked, if --metrics-port is taken by
    another process than that daemon (which closes it before it releases the directory): the
    new daemon would fail once the running one is gone."""
    port, addr = daemon.config.metrics_port, daemon.config.metrics_addr
    if not port:
        return
    try:
        with socket.create_server((addr, port)):
            return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise handover.HandoverError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror}"
            ) from None
    with contextlib.suppress(psutil.Error):
        listening = psutil.Process(running).net_connections("inet")
        if any(c.laddr and c.laddr.port == port for c in listening):
            return  # the running daemon's own: free once it has handed over
    raise handover.HandoverError(
        f"cannot serve metrics on {addr}:{port}: another process than the running manager "
        "uses that port; nothing was changed"
    )
