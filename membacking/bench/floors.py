"""Floors: membacking's own hops for a fault and for a removal, made with the least Python that
can make them and no protocol (both ends raw). Beside the raw baselines they show what the shape
of the service costs (a request on the fd socket answered on ZeroMQ, the mapper thread's hand-off,
acks on the fd socket) before any of membacking's own code runs.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import zmq

from ..ffi import PAGE_SIZE, Reservation
from .procs import connect_seqpacket, cpu_seconds, endpoints, stop
from .turns import Removal

_SPAWN = multiprocessing.get_context("spawn")
#: what stands in for a SendMappings, a Map, an FdGrant, an Unmap and an UnmapAck (their sizes)
_REQUEST, _MAP, _GRANT, _UNMAP, _ACK = b"r" * 8, b"m" * 9, b"g" * 7, b"u" * 10, b"a" * 4
#: seconds any wait may take before the floor gives up (a benchmark error, not a measurement)
_TIMEOUT = 30.0


# ---- a fault -------------------------------------------------------------------------------


def _fault_server(path: str, endpoint: str, with_fd: bool) -> None:
    """The manager's side: read each request from the fd socket in a zmq_poll loop, answer it
    on a ROUTER, and push an fd right behind the answer (`with_fd`), until the client hangs up."""
    memfd = os.memfd_create("bench-floor")
    os.ftruncate(memfd, PAGE_SIZE)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        conn, _ = listener.accept()
        with conn:
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, b"ready"])
            items = [(conn.fileno(), zmq.POLLIN)]
            while True:
                zmq.zmq_poll(items, -1)
                if not conn.recv(64):
                    router.send_multipart([identity, b"stop"])  # ends the mapper thread
                    break
                router.send(identity, zmq.SNDMORE)
                router.send(_MAP)
                if with_fd:
                    socket.send_fds(conn, [_GRANT], [memfd])
    router.close(linger=1000)
    ctx.term()
    os.close(memfd)


@contextlib.contextmanager
def fault(with_fd: bool, warm: bool = False) -> Iterator[Callable[[], float]]:
    """A probe: a fault made of membacking's hops and little else. The faulting thread sets a
    gate and sends a request on a SEQPACKET socket; the server answers on ZeroMQ (and pushes an
    fd behind the answer, `with_fd`); a mapper thread takes the answer (and the fd), maps it
    MAP_FIXED into a reservation and opens the gate; the faulting thread reads a byte. With
    `warm`, an untimed fault runs just before the timed one (as in membacking's probe of a
    fault with the fd held)."""
    with endpoints() as (path, endpoint), contextlib.ExitStack() as stack:
        server = _SPAWN.Process(target=_fault_server, args=(path, endpoint, with_fd), daemon=True)
        server.start()
        stack.callback(stop, server)
        ctx = zmq.Context()
        stack.callback(ctx.term)
        dealer = ctx.socket(zmq.DEALER)
        stack.callback(dealer.close, 0)
        conn = connect_seqpacket(path)
        reservation = Reservation(16 * PAGE_SIZE)
        stack.callback(reservation.release)
        view = reservation.buffer()
        stack.callback(view.release)
        held = os.memfd_create("bench-floor-held")
        stack.callback(os.close, held)
        os.ftruncate(held, PAGE_SIZE)
        gates: collections.deque[threading.Lock] = collections.deque()

        def mapper_thread() -> None:
            items = [(dealer, zmq.POLLIN)]
            while True:
                zmq.zmq_poll(items, -1)
                if dealer.recv(zmq.NOBLOCK) == b"stop":
                    return
                fd = socket.recv_fds(conn, 64, 1)[1][0] if with_fd else held
                reservation.map_fd(0, PAGE_SIZE, fd, 0, True)
                gates.popleft().release()
                if with_fd:
                    os.close(fd)  # membacking keeps it; the baseline closes it after timing

        def one() -> float:
            started = time.perf_counter()
            gate = threading.Lock()
            gate.acquire()
            gates.append(gate)  # registered before the request, as a waiter is
            conn.send(_REQUEST)
            if not gate.acquire(timeout=_TIMEOUT):
                raise RuntimeError("the floor's fault server did not answer")
            view[0]
            seconds = time.perf_counter() - started
            reservation.unmap(0, PAGE_SIZE)
            return seconds

        def probe() -> float:
            if warm:
                one()
            return one()

        dealer.connect(endpoint)
        dealer.send(b"hello")
        if not dealer.poll(int(_TIMEOUT * 1000)):
            raise RuntimeError("the floor's fault server did not start")
        dealer.recv()
        thread = threading.Thread(target=mapper_thread, daemon=True)
        thread.start()
        # unwound first: the server says stop to the mapper thread when the connection closes
        stack.callback(thread.join, _TIMEOUT)
        stack.callback(conn.close)
        yield probe


# ---- a removal -----------------------------------------------------------------------------


def _holder(path: str, endpoint: str, pipe: Connection) -> None:
    """One holder: maps a page when poked over `pipe` (as membacking's removal benchmark makes
    its holders fault the region in), and on each message on its DEALER puts the placeholder
    back and acks on its SEQPACKET socket, in a thread of its own (as the mapper thread does)."""
    conn = connect_seqpacket(path)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    reservation = Reservation(16 * PAGE_SIZE)
    memfd = os.memfd_create("bench-floor-holder")
    os.ftruncate(memfd, PAGE_SIZE)

    def mapper_thread() -> None:
        items = [(dealer, zmq.POLLIN)]
        while True:
            zmq.zmq_poll(items, -1)
            if dealer.recv(zmq.NOBLOCK) == b"bye":
                return
            reservation.unmap(0, PAGE_SIZE)
            conn.send(_ACK)

    dealer.send(b"hello")
    thread = threading.Thread(target=mapper_thread, daemon=True)
    thread.start()
    pipe.send("ready")
    while pipe.recv() == "touch":
        reservation.map_fd(0, PAGE_SIZE, memfd, 0, True)
        pipe.send("ok")
    thread.join(10)
    dealer.close(linger=1000)
    ctx.term()
    conn.close()
    reservation.release()
    os.close(memfd)


@contextlib.contextmanager
def removal(holders: int) -> Iterator[Callable[[], Removal]]:
    """A probe: the hops of a removal. Pokes every holder (it maps its page), then times a
    ROUTER's message to each of `holders` processes until the last ack read from their
    SEQPACKET sockets."""
    with endpoints() as (path, endpoint):
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        router.setsockopt(zmq.RCVTIMEO, int(_TIMEOUT * 1000))  # for the holders' hellos
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.settimeout(_TIMEOUT)
        listener.bind(path)
        listener.listen(holders)
        procs, pipes, conns = [], [], []
        identities: list[bytes] = []
        try:
            for _ in range(holders):
                parent, child = _SPAWN.Pipe()
                proc = _SPAWN.Process(target=_holder, args=(path, endpoint, child), daemon=True)
                proc.start()
                procs.append(proc)
                pipes.append(parent)
                conns.append(listener.accept()[0])
            identities = [router.recv_multipart()[0] for _ in range(holders)]
            for pipe in pipes:
                if not pipe.poll(_TIMEOUT):
                    raise RuntimeError("a floor holder did not start")
                pipe.recv()
            for conn in conns:
                conn.settimeout(None)
            pids = [p.pid for p in procs if p.pid is not None]
            items = [(c.fileno(), zmq.POLLIN) for c in conns]
            by_fileno = {c.fileno(): c for c in conns}

            def probe() -> Removal:
                for pipe in pipes:
                    pipe.send("touch")
                    pipe.recv()
                before = cpu_seconds(pids), cpu_seconds([os.getpid()])
                started = time.perf_counter()
                for identity in identities:
                    router.send(identity, zmq.SNDMORE)
                    router.send(_UNMAP)
                left = holders
                while left > 0:
                    ready = zmq.zmq_poll(items, int(_TIMEOUT * 1000))
                    if not ready:
                        raise RuntimeError("a floor holder did not ack")
                    for fileno, _ in ready:
                        if not by_fileno[fileno].recv(64):
                            raise RuntimeError("a floor holder went away")
                        left -= 1
                seconds = time.perf_counter() - started
                server_cpu = cpu_seconds([os.getpid()]) - before[1]
                holder_cpu = (cpu_seconds(pids) - before[0]) / holders
                return Removal(seconds, holder_cpu, server_cpu, seconds)

            yield probe
        finally:
            for identity in identities:
                router.send_multipart([identity, b"bye"])
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("quit")
            for proc in procs:
                stop(proc)
            for conn in conns:
                conn.close()
            listener.close()
            router.close()
            ctx.term()


# ---- faults in parallel --------------------------------------------------------------------


def _parallel_client(path: str, endpoint: str, index: int, pipe: Connection) -> None:
    """One floor mapper process: on "go", a first fault of each of `count` pages in turn, each
    made of the hops of `fault(with_fd=True)` (request on the SEQPACKET socket, answer on the
    DEALER, fd behind it, mapped by the mapper thread, gate opened); the fds are kept, as
    membacking's mapper keeps them."""
    conn = connect_seqpacket(path)
    conn.send(bytes([index]))  # which DEALER is this connection's
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send(bytes([index]))
    count = pipe.recv()
    reservation = Reservation(count * PAGE_SIZE)
    view = reservation.buffer()
    waiting: collections.deque[tuple[threading.Lock, int]] = collections.deque()
    kept: list[int] = []

    def mapper_thread() -> None:
        items = [(dealer, zmq.POLLIN)]
        while True:
            zmq.zmq_poll(items, -1)
            if dealer.recv(zmq.NOBLOCK) == b"stop":
                return
            fd = socket.recv_fds(conn, 64, 1)[1][0]
            kept.append(fd)
            gate, offset = waiting.popleft()
            reservation.map_fd(offset, PAGE_SIZE, fd, 0, True)
            gate.release()

    thread = threading.Thread(target=mapper_thread, daemon=True)
    thread.start()
    pipe.send("ready")
    pipe.recv()  # go
    started = time.perf_counter()
    for i in range(count):
        gate = threading.Lock()
        gate.acquire()
        waiting.append((gate, i * PAGE_SIZE))
        conn.send(_REQUEST)
        if not gate.acquire(timeout=_TIMEOUT):
            raise RuntimeError("the floor's fault server did not answer")
        view[i * PAGE_SIZE]
    pipe.send(time.perf_counter() - started)
    thread.join(_TIMEOUT)
    view.release()
    reservation.release()
    for fd in kept:
        os.close(fd)
    dealer.close(linger=1000)
    ctx.term()
    conn.close()


def parallel(clients: int, per_client: int) -> tuple[float, float]:
    """Faults per second with `clients` floor mapper processes each making `per_client` first
    faults at once against one server (this process: it polls every SEQPACKET connection and
    answers on a ROUTER with an fd behind, as the manager does), and the CPU seconds each fault
    cost (the clients' and the server's), as `cases.parallel_faults` measures membacking."""
    with endpoints() as (path, endpoint), contextlib.ExitStack() as stack:
        memfd = os.memfd_create("bench-floor-parallel")
        stack.callback(os.close, memfd)
        os.ftruncate(memfd, PAGE_SIZE)
        ctx = zmq.Context()
        stack.callback(ctx.term)
        router = ctx.socket(zmq.ROUTER)
        stack.callback(router.close, 0)
        router.setsockopt(zmq.RCVTIMEO, int(_TIMEOUT * 1000))  # for the clients' hellos
        router.bind(endpoint)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stack.callback(listener.close)
        listener.settimeout(_TIMEOUT)
        listener.bind(path)
        listener.listen(clients)
        procs, pipes = [], []
        conns: dict[int, socket.socket] = {}
        for index in range(clients):
            parent, child = _SPAWN.Pipe()
            proc = _SPAWN.Process(
                target=_parallel_client, args=(path, endpoint, index, child), daemon=True
            )
            proc.start()
            stack.callback(stop, proc)
            procs.append(proc)
            pipes.append(parent)
            stack.callback(parent.close)
            parent.send(per_client)
            conn = listener.accept()[0]
            stack.callback(conn.close)
            conn.settimeout(_TIMEOUT)
            conns[conn.recv(8)[0]] = conn
        identities: dict[int, bytes] = {}
        for _ in range(clients):
            identity, hello = router.recv_multipart()
            identities[hello[0]] = identity
        for pipe in pipes:
            if not pipe.poll(_TIMEOUT) or pipe.recv() != "ready":
                raise RuntimeError("a floor mapper did not start")
        for conn in conns.values():
            conn.setblocking(True)
        by_fileno = {conn.fileno(): (conn, identities[i]) for i, conn in conns.items()}
        items = [(fileno, zmq.POLLIN) for fileno in by_fileno]
        pids = [os.getpid(), *(p.pid for p in procs if p.pid is not None)]
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        for pipe in pipes:
            pipe.send("go")
        remaining = clients * per_client
        while remaining:
            ready = zmq.zmq_poll(items, int(_TIMEOUT * 1000))
            if not ready:
                raise RuntimeError("the floor mappers stopped asking")
            for fileno, _ in ready:
                conn, identity = by_fileno[fileno]
                if not conn.recv(64):
                    raise RuntimeError("a floor mapper went away")
                router.send(identity, zmq.SNDMORE)
                router.send(_MAP)
                socket.send_fds(conn, [_GRANT], [memfd])
                remaining -= 1
        for pipe in pipes:
            if not pipe.poll(_TIMEOUT):
                raise RuntimeError("a floor mapper did not finish")
            pipe.recv()
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu_before
        for identity in identities.values():
            router.send_multipart([identity, b"stop"])
    faults = clients * per_client
    return faults / elapsed, cpu / faults
