"""What a state directory must be before a manager adopts it: real directories and files on
/dev/shm (a tmpfs) and /tmp (not one), made wrong the ways an operator or another user could."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from membacking.manager.statedir import (
    StateDir,
    StateDirError,
    default_state_dir,
    filesystem_of,
    left_behind,
)
from membacking.runtime import RuntimePaths

OTHER_UID = 65534  # nobody


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path("/dev/shm") / f"mb-test-{uuid.uuid4().hex[:12]}"
    yield path
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
        for name in dirs:
            target = os.path.join(dirpath, name)
            (os.unlink if os.path.islink(target) else os.rmdir)(target)
    if path.exists():
        path.rmdir()


def test_a_journal_of_another_uid_is_not_adopted(root: Path) -> None:
    root.mkdir(mode=0o700)
    (root / "journal").write_bytes(b"anything")
    os.chown(root / "journal", OTHER_UID, OTHER_UID)
    with pytest.raises(StateDirError, match=f"journal {root}/journal belongs to uid {OTHER_UID}"):
        StateDir(root).acquire()


def test_a_memory_directory_that_is_a_link_is_refused(root: Path, tmp_path: Path) -> None:
    root.mkdir(mode=0o700)
    (root / "mem").symlink_to(tmp_path)
    with pytest.raises(StateDirError, match=r"memory directory .* is a symbolic link"):
        StateDir(root).acquire()


def test_modes_that_let_others_in_are_tightened_and_said(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "mem").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "mem", 0o755)
    (root / "mem" / "7").write_bytes(b"\0" * 4096)
    os.chmod(root / "mem" / "7", 0o644)
    state = StateDir(root)
    with caplog.at_level(logging.WARNING, logger="membacking.manager"):
        state.acquire()
        fd = state.open_file("7")
    os.close(fd)
    state.release(remove=False)
    assert stat.S_IMODE(os.stat(root / "mem").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert f"{root} had mode 755: set to 700" in caplog.text
    assert stat.S_IMODE(os.stat(root / "mem" / "7").st_mode) == 0o600
    assert "had mode 755: set to 700" in caplog.text
    assert "had mode 644: set to 600" in caplog.text


def test_a_second_manager_is_told_which_pid_holds_it(root: Path) -> None:
    first = StateDir(root)
    first.acquire()
    try:
        with pytest.raises(StateDirError, match=rf"in use by another .*\(pid {os.getpid()}\)"):
            StateDir(root).acquire()
    finally:
        first.release(remove=True)


def test_a_state_directory_off_tmpfs_is_warned_of(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kind = filesystem_of(tmp_path)
    if kind is None or kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {kind}: no file system here that is not in memory")
    assert filesystem_of(root) == "tmpfs"
    with caplog.at_level(logging.WARNING, logger="membacking.manager"):
        on_shm = StateDir(root)
        on_shm.acquire()
        on_shm.release(remove=True)
        assert "not a tmpfs" not in caplog.text
        on_disk = StateDir(tmp_path / "state")
        on_disk.acquire()
        on_disk.release(remove=True)
    assert f"is on a {kind} file system, not a tmpfs" in caplog.text


def test_the_state_of_a_running_manager_is_not_called_left_behind(tmp_path: Path) -> None:
    """--no-state warns of a state an earlier manager left in the default state directory;
    not of one a running manager holds (removing that would take its guest memory)."""
    paths = RuntimePaths.resolve(tmp_path / "run")
    state = StateDir(default_state_dir(paths))
    state.acquire()
    try:
        os.close(state.create_file("1", 4096))
        assert left_behind(paths) is None
    finally:
        state.release(remove=False)
    try:
        warning = left_behind(paths)
        assert warning is not None and "left in" in warning and "state remove --force" in warning
    finally:
        shutil.rmtree(default_state_dir(paths), ignore_errors=True)


def test_the_file_system_is_read_once_by_a_daemon_preparing_a_takeover(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon taking over reads the state directory's file system type when it prepares,
    before it asks: claiming the directory after the release (while every mapper waits) does
    not read /proc/self/mountinfo again, and still warns of a file system not in memory."""
    from membacking.manager import statedir
    from membacking.manager.persist import PersistConfig, Persistence

    read: list[Path] = []

    def counted(path: Path) -> str:
        read.append(path)
        return "ext4"

    monkeypatch.setattr(statedir, "filesystem_of", counted)
    persist = Persistence(PersistConfig(state_dir=root), RuntimePaths.resolve(tmp_path))
    assert persist.prepare(None, None) is None  # type: ignore[arg-type]  # no journal there
    assert read == [root]
    with caplog.at_level(logging.WARNING, logger="membacking.manager"):
        persist.dir.acquire()
    assert read == [root] and "not a tmpfs" in caplog.text
    persist.dir.release(remove=True)
