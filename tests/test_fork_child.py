"""A child forked from a mapper's process (os.fork, multiprocessing's fork) is no mapper: every
access through the inherited GuestMemory raises DetachedError at once, no guest memory, memory
file or fd of it stays in the child, a view from before the fork reads zeros there, a lock held
at the fork by another thread does not block it, attaching again works, the parent goes on."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import membacking
from membacking import GuestMemory
from membacking.mapper.lease import LEASE

from conftest import RunningManager

FORKED = r"was forked from process \d+, which attached this GuestMemory .*attach again"
FAULT_TIMEOUT = 30.0  # an access that waited for the mapper thread would wait this long


def _memory_files(pid: int | str = "self") -> list[str]:
    """Lines of /proc/PID/maps and targets of /proc/PID/fd naming a guest memory file."""
    maps = [
        line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "membacking:" in line
    ]
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return maps + [target for target in fds if "membacking:" in target]


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            inodes.add(os.readlink(f"/proc/self/fd/{fd}"))
    return inodes


def _fork(child: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Fork; the child runs `child` and reports its dict (or how it failed), then exits. Returns
    a function that waits for its report and its exit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            try:
                out = child()
            except BaseException as exc:
                out = {"failed": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)

    def report(timeout: float = 2 * FAULT_TIMEOUT) -> dict[str, Any]:
        data = b""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                if select.select([r], [], [], left)[0]:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.close(r)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended: {status:#x}"
        return json.loads(data)  # type: ignore[no-any-return]

    return report


def _error_of(op: Callable[[], object]) -> tuple[str, float]:
    """The exception `op` raises (type and message) and how long it took to raise it."""
    start = time.monotonic()
    try:
        op()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - start
    return "no error", time.monotonic() - start


def _accesses(mem: GuestMemory) -> dict[str, tuple[str, float]]:
    """Each kind of access through `mem`, with what it raised."""
    return {
        "read_plain": _error_of(lambda: mem.read_plain(0x1000, "<Q")),
        "write_plain": _error_of(lambda: mem.write_plain(0x1000, "<Q", 5)),
        "read_at": _error_of(lambda: mem.read_at(0x1000, 100)),
        "write_at": _error_of(lambda: mem.write_at(0x1003, b"xyz")),
        "fetch_add": _error_of(lambda: mem.fetch_add(0x1000, "<Q", 1)),
        "view": _error_of(lambda: mem.view(0x1000, 8).__enter__()),
        "sharing": _error_of(mem.sharing),
        "make_eager": _error_of(lambda: mem.make_eager(timeout=FAULT_TIMEOUT)),
    }


def _assert_refused(accesses: dict[str, tuple[str, float]]) -> None:
    for what, (error, took) in accesses.items():
        assert error.startswith("DetachedError: "), (what, error)
        assert re.search(FORKED, error), (what, error)
        assert took < FAULT_TIMEOUT, (what, took)  # it did not wait for the mapper thread


def test_a_forked_child_holds_nothing_and_every_access_raises(manager: RunningManager) -> None:
    rt = str(manager.runtime_dir)
    mem = membacking.attach(rt, name="parent", fault_timeout=FAULT_TIMEOUT)
    try:
        mem.write_plain(0x1000, "<Q", 0x1234)
        assert _memory_files(), "the parent maps ram0 and holds its fd"
        fd_socket = os.readlink(f"/proc/self/fd/{mem._mapper.link.fd_sock.fileno()}")

        block = mem.view(0x1000, 8, write=True)
        view = block.__enter__()  # a view opened before the fork

        def child() -> dict[str, Any]:
            out: dict[str, Any] = {"view": bytes(view[:8]).hex()}
            view[0] = 0xAB  # private to the child now: no fault, not in guest memory
            out["view_after_write"] = bytes(view[:2]).hex()
            block.__exit__(None, None, None)  # its block ends in the child (the pin with it)
            out["at_once"] = _accesses(mem)
            time.sleep(2 * LEASE)  # the inherited lease has run out by now
            out["later"] = _accesses(mem)
            out["files"] = _memory_files()
            out["fd_socket_kept"] = fd_socket in _socket_inodes()
            out["manager_gone"] = mem.manager_gone
            mem.detach()  # nothing to detach here: returns at once
            with membacking.attach(rt, name="child") as again:
                out["again_reads"] = again.read_plain(0x1000, "<Q")
                again.write_plain(0x2000, "<Q", 0x77)
            return out

        try:
            got = _fork(child)()
            assert bytes(view[:2]).hex() == "3412", "the child's write through its view leaked"
        finally:
            block.__exit__(None, None, None)
        assert "failed" not in got, got
        assert got["view"] == "0000000000000000"  # zeros, not guest memory, and no crash
        assert got["view_after_write"] == "ab00"
        _assert_refused(got["at_once"])
        _assert_refused(got["later"])
        assert got["files"] == [] and not got["fd_socket_kept"]
        assert "forked" in got["manager_gone"]
        assert got["again_reads"] == 0x1234  # a fresh attach in the child works
        # the parent is unaffected: its memory, its mapper, a removal answered by it alone
        assert mem.read_plain(0x1000, "<Q") == 0x1234
        assert mem.read_plain(0x2000, "<Q") == 0x77
        client = manager.client()
        client.add_region("dev0", 0x40000000, 1 << 20)
        mem.write_at(0x40000000, b"dev")
        assert client.remove_region("dev0")["unmapped_from"] == [mem.mapper_id]
    finally:
        mem.detach()


def test_a_lock_held_at_the_fork_by_another_thread_blocks_nothing(
    manager: RunningManager,
) -> None:
    with membacking.attach(str(manager.runtime_dir), fault_timeout=FAULT_TIMEOUT) as mem:
        mem.write_plain(0x1000, "<Q", 1)
        held, done = threading.Event(), threading.Event()

        def hold() -> None:  # an access of another thread, in the middle of its copy
            with mem._mapper.lock:
                held.set()
                done.wait(2 * FAULT_TIMEOUT)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(FAULT_TIMEOUT)
            report = _fork(lambda: {"accesses": _accesses(mem)})
            got = report()
        finally:
            done.set()
            holder.join()
        assert "failed" not in got, got
        _assert_refused(got["accesses"])
        assert mem.read_plain(0x1000, "<Q") == 1


def _worker(mem: GuestMemory, removed: Any, results: Any) -> None:
    removed.wait(FAULT_TIMEOUT)
    error, _ = _error_of(lambda: mem.write_plain(0x50000000, "<Q", 0xC0FFEE))
    results.put({"error": error, "files": _memory_files()})


def test_a_multiprocessing_fork_child_is_outside_every_removal(manager: RunningManager) -> None:
    client = manager.client()
    client.add_region("fk", 0x50000000, 1 << 20)
    ctx = multiprocessing.get_context("fork")
    with membacking.attach(str(manager.runtime_dir), fault_timeout=FAULT_TIMEOUT) as mem:
        mem.write_plain(0x50000000, "<Q", 1)
        removed, results = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_worker, args=(mem, removed, results))
        proc.start()
        try:
            assert client.remove_region("fk")["unmapped_from"] == [mem.mapper_id]
            assert proc.pid is not None and _memory_files(proc.pid) == []
            removed.set()
            got = results.get(timeout=2 * FAULT_TIMEOUT)
        finally:
            proc.join(2 * FAULT_TIMEOUT)
            if proc.is_alive():
                proc.kill()
        assert proc.exitcode == 0
        assert got["error"].startswith("DetachedError: ") and "forked" in got["error"], got
        assert got["files"] == []
        assert mem.read_plain(0x1000, "<Q") == 0  # the parent goes on


def test_a_fork_while_an_fd_arrives_leaves_the_child_nothing(manager: RunningManager) -> None:
    """The fd of a first fault, received and not yet in the mapper's table, when another thread
    forks: the fork waits for the table, so the child closes that fd with the others."""
    client = manager.client()
    client.add_region("late", 0x60000000, 1 << 20)
    with membacking.attach(str(manager.runtime_dir), fault_timeout=FAULT_TIMEOUT) as mem:
        mem.write_plain(0x1000, "<Q", 1)
        link = mem._mapper.link
        receive = link.recv_fd_message
        arrived = threading.Event()

        def slow_receive(*args: Any, **kwargs: Any) -> Any:
            got = receive(*args, **kwargs)
            if got is not None and not arrived.is_set():
                arrived.set()
                time.sleep(0.5)  # the fd is here, the table does not name it yet
            return got

        link.recv_fd_message = slow_receive  # type: ignore[method-assign]
        fault = threading.Thread(target=mem.write_plain, args=(0x60000000, "<Q", 2))
        fault.start()
        try:
            assert arrived.wait(FAULT_TIMEOUT)
            got = _fork(lambda: {"files": _memory_files()})()
        finally:
            fault.join()
            link.recv_fd_message = receive  # type: ignore[method-assign]
        assert got == {"files": []}
        assert mem.read_plain(0x60000000, "<Q") == 2  # the parent's fault completed
