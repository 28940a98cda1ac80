"""Where a manager's sockets and lock live, shared by the daemon, mappers and the CLI.

One rule for all of them (`choose_runtime_dir`): --runtime-dir, else $MEMBACKING_RUNTIME_DIR,
else the configuration file's `runtime_dir`, else $XDG_RUNTIME_DIR/membacking, else
/tmp/membacking-<uid>.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "MEMBACKING_RUNTIME_DIR"
#: Linux's limit for a Unix socket path (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107


#: Environment variable naming the configuration file (as `--config` does).
CONFIG_ENV_VAR = "MEMBACKING_CONFIG"


def choose_runtime_dir(
    option: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """The runtime directory and where the choice came from, first match wins: the
    --runtime-dir `option`, $MEMBACKING_RUNTIME_DIR, the configuration file's `config` value,
    $XDG_RUNTIME_DIR/membacking, /tmp/membacking-<uid>."""
    if option is not None and os.fspath(option):
        return Path(option), "--runtime-dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), f"${ENV_VAR}"
    if config is not None and os.fspath(config):
        return Path(config), "configuration file"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "membacking", "$XDG_RUNTIME_DIR"
    return Path(f"/tmp/membacking-{os.getuid()}"), "default"


def default_runtime_dir() -> Path:
    """The runtime directory when neither an option nor a configuration file names one."""
    return choose_runtime_dir()[0]


@dataclass(frozen=True)
class RuntimePaths:
    """The files of one manager's runtime directory."""

    root: Path

    @classmethod
    def resolve(cls, runtime_dir: str | os.PathLike[str] | None = None) -> RuntimePaths:
        root = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        return cls(root.absolute())

    @property
    def lock(self) -> Path:
        return self.root / "manager.lock"

    @property
    def fd_socket(self) -> Path:
        return self.root / "fd.sock"

    @property
    def fd_socket_staging(self) -> Path:
        """Where a manager binds fd.sock and makes it listen before it renames it into place
        (no longer than control.ipc: check_lengths covers it)."""
        return self.root / "fd.sock.new"

    @property
    def mapper_socket(self) -> Path:
        return self.root / "mapper.ipc"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.ipc"

    @property
    def mapper_endpoint(self) -> str:
        return f"ipc://{self.mapper_socket}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.control_socket}"

    def manager_running(self) -> bool | None:
        """Whether a daemon holds this directory's lock: False when nobody does (any socket
        left here is stale), None when this process cannot tell (no access to the lock)."""
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            # A shared lock is granted only while no daemon holds its exclusive one; it goes
            # with the close below (a daemon starting at this instant retries its own).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)

    def too_long(self) -> tuple[Path, int] | None:
        """The longest socket path and its length in bytes, if it is too long for the kernel."""
        sockets = (self.fd_socket, self.mapper_socket, self.control_socket)
        longest = max(sockets, key=lambda path: len(os.fsencode(path)))
        size = len(os.fsencode(longest))
        return (longest, size) if size > MAX_SOCKET_PATH else None

    def check_lengths(self) -> None:
        """Raise ValueError if a socket path is too long for the kernel."""
        over = self.too_long()
        if over is not None:
            raise ValueError(
                f"runtime directory {self.root} is too long: socket path {over[0]} exceeds "
                f"{MAX_SOCKET_PATH} bytes; choose a shorter --runtime-dir"
            )
