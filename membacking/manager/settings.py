"""The daemon's configuration as one structure: the regions to create at start and every
setting of `manager run` (from its options, or the TOML file through `config.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .persist import PersistConfig
from .state import DEFAULT_ADDRESS_SPACE, Limits


@dataclass(frozen=True)
class RegionSpec:
    """A region to create at start (from --region or the config file)."""

    name: str
    gpa: int
    size: int
    readonly: bool = False
    priority: int = 0
    file: str | None = None
    hugetlb: bool = False
    private: bool = False
    disabled: bool = False

    @property
    def backing(self) -> str:
        if self.file is not None:
            return "file"
        return "hugetlb" if self.hugetlb else "private" if self.private else "memfd"


@dataclass
class ManagerConfig:
    runtime_dir: str | os.PathLike[str] | None = None
    address_space: int = DEFAULT_ADDRESS_SPACE
    regions: list[RegionSpec] = field(default_factory=list)
    unmap_timeout: float = 30.0
    #: SIGKILL a mapper evicted for not answering (see docs/OPERATIONS.md for the default)
    evict_kill: bool = False
    #: allocate each RAM region's memory when it is created (backing.py)
    prealloc: bool = False
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    persist: PersistConfig = field(default_factory=PersistConfig)
    #: take over from the daemon serving the runtime directory (membacking.manager.handover)
    takeover: bool = False

    def __post_init__(self) -> None:
        from .config import check_id

        for ids in (self.allow_uids, self.allow_gids):
            for value in ids:
                check_id(value)  # a bad id must not open the sockets to everyone


def config_widens(config: ManagerConfig) -> bool:
    """Whether other users than the daemon's (and root) may connect."""
    return bool(config.allow_uids or config.allow_gids)
