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
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

import zmq

from .procs import cpu_seconds

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


class MemfdPair:
    """Two mmaps of one memfd (the raw equivalent of two mappers sharing memory)."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("bench-baseline")
        os.ftruncate(self.fd, size)
        self.a = mmap.mmap(self.fd, size)
        self.b = mmap.mmap(self.fd, size)
        self.va = memoryview(self.a)
        self.vb = memoryview(self.b)
        self.va[:] = b"\x01" * size

    def close(self) -> None:
        self.va.release()
        self.vb.release()
        self.a.close()
        self.b.close()
        os.close(self.fd)


def copy_seconds(size: int, repeat: int) -> float:
    """memoryview copy of `size` bytes from one mmap of a memfd to another."""
    pair = MemfdPair(size)
    try:
        dst = bytearray(size)
        view = memoryview(dst)
        seconds = best_of(lambda: view.__setitem__(slice(None), pair.va), repeat)
        view.release()
        return seconds
    finally:
        pair.close()


def plain_seconds(number: int) -> tuple[float, float]:
    """(struct.unpack_from, struct.pack_into) of 8 bytes on an mmap, seconds per call."""
    pair = MemfdPair(1 << 16)
    try:
        mm = pair.a
        read = best_of(lambda: struct.unpack_from("<Q", mm, 0x100), 5, number)
        write = best_of(lambda: struct.pack_into("<Q", mm, 0x100, 7), 5, number)
        return read, write
    finally:
        pair.close()


def _fd_server(path: str, count: int) -> None:
    fd = os.memfd_create("bench-fd")
    os.ftruncate(fd, 4096)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(1)
        conn, _ = server.accept()
        with conn:
            for _ in range(count):
                conn.recv(64)
                socket.send_fds(conn, [b"y" * 24], [fd])
    os.close(fd)


def seqpacket_fd_mmap_seconds(count: int) -> float:
    """Median of: request over AF_UNIX SEQPACKET, reply carrying one fd, mmap it, read a byte."""
    directory = tempfile.mkdtemp(prefix="mb-bench-", dir="/tmp")
    path = os.path.join(directory, "fd.sock")
    server = _SPAWN.Process(target=_fd_server, args=(path, count), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        samples = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            while True:  # the file exists from bind(); connections are taken from listen()
                try:
                    client.connect(path)
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            for _ in range(count):
                started = time.perf_counter()
                client.send(b"x" * 24)
                _, fds, _, _ = socket.recv_fds(client, 64, 4)
                mapped = mmap.mmap(fds[0], 4096)
                mapped[0]
                samples.append(time.perf_counter() - started)
                mapped.close()
                os.close(fds[0])
        return statistics.median(samples)
    finally:
        server.join(10)
        Path(path).unlink(missing_ok=True)
        os.rmdir(directory)


def _echo_router(endpoint: str, count: int) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    for _ in range(count):
        router.send_multipart(router.recv_multipart())
    router.close(linger=1000)
    ctx.term()


def zmq_round_trip_seconds(count: int) -> float:
    """Median DEALER -> ROUTER -> DEALER round trip of a 24-byte message between processes."""
    directory = tempfile.mkdtemp(prefix="mb-bench-", dir="/tmp")
    endpoint = f"ipc://{directory}/echo"
    server = _SPAWN.Process(target=_echo_router, args=(endpoint, count + 1), daemon=True)
    server.start()
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send(b"hello")
        dealer.recv()  # the server is up
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            dealer.send(b"x" * 24)
            dealer.recv()
            samples.append(time.perf_counter() - started)
        dealer.close()
        return statistics.median(samples)
    finally:
        ctx.term()
        server.join(10)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _ack_dealer(endpoint: str, ready: Connection) -> None:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send(b"hi")
    ready.send(True)
    while dealer.recv() != b"bye":
        dealer.send(b"ack")
    dealer.close(linger=1000)
    ctx.term()


@contextlib.contextmanager
def _router_with_dealers(
    name: str, count: int
) -> Iterator[tuple[zmq.Socket[bytes], list[bytes], list[int]]]:
    """A ROUTER and `count` DEALER processes that ack every message; yields the ROUTER, the
    DEALERs' identities and their pids once every one of them is connected. The DEALERs exit
    only after the block, so no exit is ever measured inside it."""
    directory = tempfile.mkdtemp(prefix="mb-bench-", dir="/tmp")
    endpoint = f"ipc://{directory}/{name}"
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
        yield router, identities, [cast(int, proc.pid) for proc in procs]
    finally:
        for identity in identities:
            router.send_multipart([identity, b"bye"])
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        router.close()
        ctx.term()
        for entry in os.listdir(directory):
            os.unlink(os.path.join(directory, entry))
        os.rmdir(directory)


def zmq_parallel_rate(clients: int, per_client: int) -> tuple[float, float]:
    """Round trips per second with `clients` DEALER processes hammering one ROUTER echo, and
    the CPU seconds each round trip cost (the DEALER processes' and this one's)."""
    with _router_with_dealers("echo", clients) as (router, peers, pids):
        pids = [os.getpid(), *pids]
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


@dataclass
class Fanout:
    """A ROUTER sending one message to each of `peers` DEALER processes and taking every ack."""

    seconds: float  #: median
    dealer_cpu: float  #: mean CPU seconds per DEALER (every thread of its process)
    router_cpu: float  #: mean CPU seconds of the ROUTER's process


def zmq_fanout(peers: int, rounds: int) -> Fanout:
    with _router_with_dealers("fanout", peers) as (router, identities, pids):
        samples = []
        dealer_cpu = router_cpu = 0.0
        for _ in range(rounds):
            dealers_before, router_before = cpu_seconds(pids), cpu_seconds([os.getpid()])
            started = time.perf_counter()
            for identity in identities:
                router.send_multipart([identity, b"unmap"])
            for _ in identities:
                router.recv_multipart()
            samples.append(time.perf_counter() - started)
            router_cpu += cpu_seconds([os.getpid()]) - router_before
            dealer_cpu += cpu_seconds(pids) - dealers_before
    return Fanout(statistics.median(samples), dealer_cpu / rounds / peers, router_cpu / rounds)
