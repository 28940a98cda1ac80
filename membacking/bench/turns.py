"""Measuring the variants of one operation in turn: one probe of each per turn, the order rotated
every turn, so that the machine's drift during a run (large here) falls on every variant alike;
`timed` makes a probe of a call, and `Removal` is what a removal probe returns.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def in_turn(probes: Mapping[str, Callable[[], T]], turns: int) -> dict[str, list[T]]:
    """Every probe's results over `turns` turns; each turn runs each probe once, starting one
    further along the list than the turn before."""
    names = list(probes)
    samples: dict[str, list[T]] = {name: [] for name in names}
    for turn in range(turns):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(probes[name]())
    return samples


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """A probe: the seconds one call of `fn` takes."""

    def probe() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return probe


def medians(samples: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Removal:
    """One removal (or fan-out) with every holder's ack, or the summary of several."""

    seconds: float  #: to the last ack (the manager's own measure, or the raw fan-out's)
    holder_cpu: float  #: CPU seconds per holder process (every thread of it)
    server_cpu: float  #: CPU seconds of the manager (control request and reply included)
    client_seen: float  #: seconds as the control client saw it (the raw fan-out: `seconds`)

    @staticmethod
    def summary(samples: list[Removal]) -> Removal:
        """Median times, mean CPU."""
        return Removal(
            statistics.median(s.seconds for s in samples),
            statistics.fmean(s.holder_cpu for s in samples),
            statistics.fmean(s.server_cpu for s in samples),
            statistics.median(s.client_seen for s in samples),
        )
