"""What a `Shutdown` tells a mapper to do with its mappings (docs/PROTOCOL.md §9): its code,
or, for a mapper that did not negotiate SHUTDOWN_CODE, how its reason begins (the texts of
earlier releases). Both sides decide here, so the manager never sends a text a mapper misreads.
"""

from __future__ import annotations

from .messages import (
    FEATURE_REATTACH,
    FEATURE_SHUTDOWN_CODE,
    MAX_REASON_LEN,
    SHUTDOWN_EVICTED,
    SHUTDOWN_RESTARTING,
    Shutdown,
)

#: how the reason of a Shutdown without a code begins when the mapper must drop its mappings
EVICTED_TEXT = "evicted"
STOPPING_TEXT = "manager shutting down"
DROPPING_TEXTS = (EVICTED_TEXT, STOPPING_TEXT)


def shutdown_for(reason: str, code: str, features: int | None) -> Shutdown:
    """The Shutdown saying `code` to a mapper that negotiated `features` (None: no mask at all).

    Without SHUTDOWN_CODE the reason carries the code by how it begins: `evicted`, or `manager
    shutting down` for a manager that stops for good, and for one that restarts when the mapper
    lacks REATTACH (it cannot prove what it holds to the next manager, so it must drop it); a
    restart a REATTACH mapper survives never begins so."""
    features = features or 0
    if features & FEATURE_SHUTDOWN_CODE:
        return Shutdown(reason, code)
    if code == SHUTDOWN_EVICTED:
        prefix: str | None = EVICTED_TEXT
    elif code == SHUTDOWN_RESTARTING and features & FEATURE_REATTACH:
        prefix = None
    else:  # stopping, or an unknown code (read as stopping)
        prefix = STOPPING_TEXT
    if prefix is None:
        text = f"restarting: {reason}" if reason.startswith(DROPPING_TEXTS) else reason
    else:
        text = reason if reason.startswith(prefix) else f"{prefix}: {reason}"
    return Shutdown(text[:MAX_REASON_LEN])


def drops_mappings(shutdown: Shutdown) -> bool:
    """Whether this Shutdown means the manager no longer backs what the mapper holds (evicted,
    or the manager stopped for good), so the mapper must drop every mapping. A manager that is
    restarting on the same state (code `restarting`) and a connection lost without a Shutdown
    (the manager died) keep them. An unknown code reads as `stopping` (docs/PROTOCOL.md §9)."""
    if shutdown.code is not None:
        return shutdown.code != SHUTDOWN_RESTARTING
    return shutdown.reason.startswith(DROPPING_TEXTS)


def mapper_drops(shutdown: Shutdown, features: int) -> bool:
    """Whether a mapper that negotiated `features` drops every mapping on this Shutdown: as
    `drops_mappings` says, and on a restart too without REATTACH (it cannot prove what it holds
    to the next manager, whatever a manager of an earlier release wrote)."""
    return drops_mappings(shutdown) or not features & FEATURE_REATTACH


def drops_on_hangup(features: int) -> bool:
    """Whether a mapper that negotiated `features` drops every mapping when fd.sock ends
    without a Shutdown (the manager died): only a REATTACH mapper keeps them (§9)."""
    return not features & FEATURE_REATTACH
