"""`membacking qemu run`'s command line: QEMU's arguments go after `--`; given without it they
are a usage mistake (status 2, one `Error:` line), never the help or arguments passed on unseen.

Also the refusal of a binary that is not QEMU. No QEMU and no manager needed: these mistakes
are found before either is looked for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--accel", "tcg", "-nographic", "-S"], "-nographic"),  # click read it as -n -o ... -h
        (["-hda", "disk.img"], "-hda"),
        (["--name", "web", "-chardev", "stdio,id=c0"], "-chardev"),
        (["-S"], "-S"),
        (["--accel=tcg", "-kernel", "bzImage"], "-kernel"),
        (["-smp", "2"], "-smp"),
        (["disk.img"], "disk.img"),
        (["-nographic", "--", "-S"], "-nographic"),
    ],
)
def test_qemu_arguments_without_dashes_are_a_usage_mistake(
    args: list[str], named: str, tmp_path: Path
) -> None:
    result = run_cli("qemu", "run", *args, runtime_dir=tmp_path, timeout=30)
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "QEMU's arguments go after --" in errors[0], result.stderr
    assert repr(named) in errors[0], errors[0]  # the argument found before --
    assert "Options:" not in result.stdout + result.stderr  # not the help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_still_works(flag: str) -> None:
    result = run_cli("qemu", "run", flag, timeout=30)
    assert result.returncode == 0 and "Options:" in result.stdout, result
    assert "Usage: membacking qemu run [OPTIONS] -- [QEMU_ARGS]..." in result.stdout


def test_options_then_dashes_reach_the_launcher(tmp_path: Path) -> None:
    """Every option of the command, in each spelling, then `--` and QEMU's arguments: parsed
    (the launcher then finds no manager: status 1, not a usage mistake)."""
    result = run_cli(
        *("qemu", "run", "--name=web", "--accel", "tcg", "--machine-opt", "usb=off"),
        *("--region", "ram", "--incoming=tcp:127.0.0.1:1", "--", "-nographic", "-S", "--"),
        runtime_dir=tmp_path,
        timeout=30,
    )
    assert result.returncode == 1, result
    assert "go after --" not in result.stderr and "Usage:" not in result.stderr


def test_not_qemu_names_the_first_line_of_its_version(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'Bochs x86 Emulator 2.7'\necho 'Built from SVN snapshot'\n")
    fake.chmod(0o755)
    result = run_cli("qemu", "run", "--qemu", str(fake), runtime_dir=tmp_path, timeout=30)
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    assert line.endswith("does not look like QEMU (its --version says 'Bochs x86 Emulator 2.7')")


def test_an_accelerator_chosen_twice_is_refused_and_one_given_once_is_kept() -> None:
    """`--accel tcg` with `-accel kvm` among QEMU's arguments: QEMU took the latter and the
    launcher said `(as given)`, the explicit choice dropped unsaid."""
    from membacking.qemu.binary import QemuError
    from membacking.qemu.launcher import accel_args

    for accel in ("tcg", "kvm"):
        for qemu_args in (["-accel", "kvm"], ["-enable-kvm"], ["--accel", "tcg"]):
            with pytest.raises(QemuError, match="both choose the accelerator"):
                accel_args(accel, qemu_args)
    assert accel_args("auto", ["-accel", "kvm"]) == ([], "as given")
    assert accel_args("none", ["-enable-kvm"]) == ([], "as given")
    assert accel_args("tcg", ["-display", "none"]) == (["-accel", "tcg"], "tcg")


@pytest.mark.parametrize(
    ("opt", "said"),
    [
        ("usb", "is not one KEY=VALUE"),
        ("=off", "is not one KEY=VALUE"),
        ("usb=off,memory-backend=other", "is not one KEY=VALUE"),
        ("memory-backend=other", "membacking sets memory-backend"),
        ("type=q35", "membacking sets type"),
        ("max-ram-below-4g=1G", "membacking sets max-ram-below-4g"),
    ],
)
def test_a_machine_opt_is_one_property_membacking_does_not_set(opt: str, said: str) -> None:
    """`--machine-opt` went into `-machine pc,memory-backend=mb-ram,...` unchecked: a comma or
    `memory-backend=` put the VM's RAM elsewhere than membacking's regions."""
    from membacking.qemu.binary import QemuError
    from membacking.qemu.launcher import _check_machine_opts

    with pytest.raises(QemuError, match=said):
        _check_machine_opts(("usb=off", opt))
    _check_machine_opts(("usb=off", "vmport=off", "dtb=/a,,b"))  # (",," is QEMU's comma)


def test_a_monitor_socket_left_by_a_killed_vm_is_said_to_be_one(tmp_path: Path) -> None:
    """A SIGKILLed launcher leaves qemu-NAME.qmp; `qemu migrate NAME` said only
    "[Errno 111] Connection refused"."""
    import socket

    from membacking.qemu.qmp import Qmp, QmpError

    path = tmp_path / "qemu-web.qmp"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))
    left.close()  # the file stays, nothing listens
    with pytest.raises(QmpError, match=r"no QEMU listens on the monitor .*no VM of that name runs"):
        Qmp(path, timeout=2)
