"""Raw baselines, measured in the same run as the membacking numbers they are compared with:
memoryview copies and struct access on mmaps of a memfd, a SEQPACKET round trip carrying an
fd plus its mmap, ZeroMQ DEALER->ROUTER round trips, and a ROUTER fan-out with acks.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import cast

import zmq

from .procs import connect_seqpacket, cpu_seconds, endpoints, stop
from .turns import Removal, timed

_SPAWN = multiprocessing.get_context("spawn")


def best_of(fn: Callable[[], object], repeat: int, number: int = 1) -> float:
    """Seconds per call of the fastest of `repeat` batches of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - started) / number)
    return best


@contextlib.contextmanager
def copy(fd: int, buf: bytearray) -> Iterator[Callable[[], float]]:
    """A probe: one memoryview copy from an mmap of the memfd `fd` into `buf`, as many bytes as
    `buf` holds (membacking's side passes its guest RAM and its own buffer, so that both copy
    the same pages into the same buffer: at 16 MiB, what the caches hold decides a lot)."""
    with mmap.mmap(fd, len(buf)) as mapped:
        source = memoryview(mapped)
        view = memoryview(buf)
        try:
            yield timed(lambda: view.__setitem__(slice(None), source))
        finally:
            view.release()
            source.release()


def plain_seconds(number: int) -> tuple[float, float]:
    """(struct.unpack_from, struct.pack_into) of 8 bytes on an mmap of a memfd, seconds per
    call."""
    fd = os.memfd_create("bench-baseline")
    try:
        os.ftruncate(fd, 1 << 16)
        with mmap.mmap(fd, 1 << 16) as mm:
            mm[0x100:0x108] = b"\x01" * 8
            read = best_of(lambda: struct.unpack_from("<Q", mm, 0x100), 5, number)
            write = best_of(lambda: struct.pack_into("<Q", mm, 0x100, 7), 5, number)
            return read, write
    finally:
        os.close(fd)


def _fd_server(path: str) -> None:
    """Answer each request with a datagram carrying one memfd, until the client hangs up."""
    fd = os.memfd_create("bench-fd")
    os.ftruncate(fd, 4096)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(1)
        conn, _ = server.accept()
        with conn:
            while conn.recv(64):
                socket.send_fds(conn, [b"y" * 24], [fd])
    os.close(fd)


@contextlib.contextmanager
def seqpacket_fd_mmap() -> Iterator[Callable[[], float]]:
    """A probe: a request over AF_UNIX SEQPACKET, a reply carrying one fd, mmap it, read a
    byte (another process answers)."""
    with endpoints() as (path, _):
        server = _SPAWN.Process(target=_fd_server, args=(path,), daemon=True)
        server.start()
        try:
            client = connect_seqpacket(path)
        except BaseException:
            stop(server, 0)
            raise

        def probe() -> float:
            started = time.perf_counter()
            client.send(b"x" * 24)
            _, fds, _, _ = socket.recv_fds(client, 64, 4)
            mapped = mmap.mmap(fds[0], 4096)
            mapped[0]
            seconds = time.perf_counter() - started
            mapped.close()
            os.close(fds[0])
            return seconds

        try:
            yield probe
        finally:
            client.close()  # the server's loop ends
            stop(server)


def _echo_router(endpoint: str) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        frames = router.recv_multipart()
        if frames[1] == b"bye":
            break
        router.send_multipart(frames)
    router.close(linger=1000)
    ctx.term()


@contextlib.contextmanager
def zmq_round_trip(warm: bool = False) -> Iterator[Callable[[], float]]:
    """A probe: a DEALER -> ROUTER -> DEALER round trip of a 24-byte message between
    processes. With `warm`, an untimed round trip runs just before the timed one (as an
    untimed fault does in membacking's probe of a fault with the fd held)."""
    with endpoints() as (_, endpoint):
        server = _SPAWN.Process(target=_echo_router, args=(endpoint,), daemon=True)
        server.start()
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        try:
            dealer.connect(endpoint)
            dealer.send(b"hello")
            if not dealer.poll(30_000):
                raise RuntimeError("the echo server did not start")
            dealer.recv()

            def probe() -> float:
                if warm:
                    dealer.send(b"x" * 24)
                    dealer.recv()
                started = time.perf_counter()
                dealer.send(b"x" * 24)
                dealer.recv()
                return time.perf_counter() - started

            yield probe
            dealer.send(b"bye")
        finally:
            dealer.close(linger=1000)
            ctx.term()
            stop(server)


def _ack_dealer(endpoint: str, pipe: Connection) -> None:
    """Ack every message on the DEALER; answer every poke on `pipe` (as a holder answers the
    touch that precedes each removal)."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send(b"hi")
    pipe.send(True)
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(pipe.fileno(), zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if pipe.fileno() in ready:
            pipe.send(pipe.recv())
        if dealer in ready:
            if dealer.recv() == b"bye":
                break
            dealer.send(b"ack")
    dealer.close(linger=1000)
    ctx.term()


@dataclass
class _Dealers:
    router: zmq.Socket[bytes]
    identities: list[bytes]
    pids: list[int]
    pipes: list[Connection]  #: one per DEALER, answering every poke


@contextlib.contextmanager
def _router_with_dealers(count: int) -> Iterator[_Dealers]:
    """A ROUTER and `count` DEALER processes that ack every message, once every one of them is
    connected. The DEALERs exit only after the block, so no exit is ever measured inside it."""
    with endpoints() as (_, endpoint):
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        procs = []
        pipes = []
        identities: list[bytes] = []
        try:
            for _ in range(count):
                parent, child = _SPAWN.Pipe()
                proc = _SPAWN.Process(target=_ack_dealer, args=(endpoint, child), daemon=True)
                proc.start()
                procs.append(proc)
                pipes.append(parent)
            identities = [router.recv_multipart()[0] for _ in range(count)]
            for pipe in pipes:
                pipe.recv()
            yield _Dealers(router, identities, [cast(int, proc.pid) for proc in procs], pipes)
        finally:
            for identity in identities:
                router.send_multipart([identity, b"bye"])
            for proc in procs:
                stop(proc)
            router.close()
            ctx.term()


def zmq_parallel_rate(clients: int, per_client: int) -> tuple[float, float]:
    """Round trips per second with `clients` DEALER processes hammering one ROUTER echo, and
    the CPU seconds each round trip cost (the DEALER processes' and this one's)."""
    with _router_with_dealers(clients) as dealers:
        router, peers = dealers.router, dealers.identities
        pids = [os.getpid(), *dealers.pids]
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        sent = dict.fromkeys(peers, 1)
        for peer in peers:
            router.send_multipart([peer, b"go"])
        remaining = clients * per_client
        while remaining:
            peer, _ = router.recv_multipart()
            remaining -= 1
            if sent[peer] < per_client:  # each client loops exactly per_client times
                sent[peer] += 1
                router.send_multipart([peer, b"go"])
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu_before
    trips = clients * per_client
    return trips / elapsed, cpu / trips


@contextlib.contextmanager
def zmq_fanout(peers: int) -> Iterator[Callable[[], Removal]]:
    """A probe: poke every DEALER over its pipe (as the removal benchmark has each holder touch
    the region before it is removed), then time a ROUTER's message to each of `peers` DEALER
    processes until the last ack."""
    with _router_with_dealers(peers) as dealers:
        router, identities, pids = dealers.router, dealers.identities, dealers.pids

        def probe() -> Removal:
            for pipe in dealers.pipes:
                pipe.send("touch")
                pipe.recv()
            before = cpu_seconds(pids), cpu_seconds([os.getpid()])
            started = time.perf_counter()
            for identity in identities:
                router.send_multipart([identity, b"unmap"])
            for _ in identities:
                router.recv_multipart()
            seconds = time.perf_counter() - started
            router_cpu = cpu_seconds([os.getpid()]) - before[1]
            dealer_cpu = (cpu_seconds(pids) - before[0]) / peers
            return Removal(seconds, dealer_cpu, router_cpu, seconds)

        yield probe
