"""What the daemon does for each mapper registering again in a handover's gap: its Hello asks
whether private RAM is in use without a walk of the regions (a count kept with the table), and
the first of them writes no journal (the block of ids was journaled by the start)."""

from __future__ import annotations

import copy
import os
import shutil
import socket
from pathlib import Path

import pytest

from membacking.manager.backing import MemfdStore
from membacking.manager.daemon import Daemon
from membacking.manager.errors import Refused
from membacking.manager.fdconn import FdConn
from membacking.manager.persist import PersistConfig
from membacking.manager.settings import ManagerConfig
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m
from membacking.protocol.fdpass import recv_message, send_message

from conftest import short_tmpdir

MiB = 1 << 20


def test_the_count_of_private_regions_follows_the_table() -> None:
    """Regions added, removed, replaced under their name and copied: the count of private
    ones is always what a walk of the table finds, and a second mapper is refused exactly
    while there is one."""
    store = MemfdStore()
    state = ManagerState(store, address_space=1 << 32)
    try:
        state.add_region("shared", 0, MiB, True)
        state.add_region("ram", None, MiB, True, enabled=False, backing="private")

        def walked() -> int:
            return sum(r.backing == "private" for r in state.regions.values())

        assert state.regions.private == walked() == 1 and state.has_private_regions()
        state.register_mapper("one", 1)
        with pytest.raises(Refused, match="private RAM"):
            state.register_mapper("two", 2)
        for copied in (copy.copy(state.regions), copy.deepcopy(state.regions)):
            assert copied.private == 1 and list(copied) == ["shared", "ram"]
        ram = state.regions["ram"]
        state.regions["ram"] = state.regions["shared"]  # replaced under its name: counted off
        assert state.regions.private == walked() == 0
        state.regions["ram"] = ram
        assert state.regions.private == walked() == 1
        state.remove_region("ram")
        assert "ram" not in state.regions
        assert state.regions.private == walked() == 0 and not state.has_private_regions()
        state.register_mapper("two", 2)  # no private RAM: more mappers may attach
        assert state.regions.pop("absent", None) is None
        with pytest.raises(TypeError):
            state.regions.update({})  # would bypass the count
    finally:
        store.close_all()


def test_the_ids_of_mappers_awaited_back_are_journaled_before_they_register(
    tmp_path: Path,
) -> None:
    """A daemon that adopts a state whose mappers still run journals a block of mapper ids
    with its first save: the first of them to say Hello again writes no journal of its own,
    and gets an id below the one journaled."""
    runtime = short_tmpdir()
    config = ManagerConfig(
        runtime_dir=runtime, persist=PersistConfig(state_dir=tmp_path / "s", keep=True)
    )
    before = Daemon(config)
    before.start()
    try:
        entry = before.state.register_mapper("back", os.getpid())  # this process: it runs
        before.state.welcome(entry, m.SUPPORTED_FEATURES)
        assert before.persist is not None
        before.persist.close(before.state, before.store, clean=True)  # kept for the next
    finally:
        before._close_all()
    after = Daemon(config)
    try:
        after.start()
        assert after.state.awaited.waiting  # this process is awaited back
        assert after.persist is not None
        journaled = after.persist.dir.read()
        assert journaled is not None and journaled.next_mapper_id > after.state._next_mapper_id
        saves: list[bool] = []
        save = after._save_state
        after._save_state = lambda: saves.append(True) or save()  # type: ignore[method-assign]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.settimeout(5)
        conn = FdConn(ours, os.getpid(), os.getuid())
        after._conns[ours.fileno()] = conn
        with theirs:
            send_message(theirs, m.Hello("back", m.SUPPORTED_FEATURES))
            after._on_fd_conn(conn)
            welcome, _ = recv_message(theirs, sender="manager")
        assert isinstance(welcome, m.Welcome) and welcome.mapper_id < journaled.next_mapper_id
        assert saves == []
    finally:
        after._close_all()
        shutil.rmtree(runtime, ignore_errors=True)
