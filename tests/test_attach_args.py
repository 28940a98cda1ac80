"""`attach()`'s argument errors: a wrong type raises ArgumentTypeError (a TypeError), a bad value
ArgumentValueError (a ValueError); both stay MembackingErrors for callers that catch those (the
CLI among them). Nothing attaches then."""

from __future__ import annotations

from typing import Any

import pytest

import membacking
from membacking import ArgumentTypeError, ArgumentValueError, MembackingError

from conftest import RunningManager

#: (keyword arguments, the standard exception they raise)
BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"eager": "yes"}, TypeError),
    ({"eager": 1}, TypeError),
    ({"eager": None}, TypeError),
    ({"name": 7}, TypeError),
    ({"name": b"worker"}, TypeError),
    ({"name": "a b"}, ValueError),
    ({"name": "-rf"}, ValueError),
    ({"name": "x" * 65}, ValueError),
    ({"timeout": "10"}, TypeError),
    ({"timeout": True}, TypeError),
    ({"timeout": None}, TypeError),
    ({"timeout": 0}, ValueError),
    ({"timeout": -1.0}, ValueError),
    ({"timeout": float("nan")}, ValueError),
    ({"fault_timeout": [30]}, TypeError),
    ({"fault_timeout": 0.0}, ValueError),
    ({"reconnect_timeout": "0"}, TypeError),
    ({"reconnect_timeout": False}, TypeError),
    ({"reconnect_timeout": -0.5}, ValueError),
    ({"runtime_dir": 5}, TypeError),
    ({"runtime_dir": b"/tmp"}, TypeError),
]


def test_attach_argument_errors_are_type_and_value_errors(manager: RunningManager) -> None:
    for kwargs, kind in BAD_ARGUMENTS:
        args = {"runtime_dir": manager.runtime_dir, **kwargs}
        with pytest.raises(kind) as info:
            membacking.attach(**args).detach()
        error = info.value
        assert isinstance(error, MembackingError), (kwargs, error)
        wanted = ArgumentTypeError if kind is TypeError else ArgumentValueError
        assert type(error) is wanted, (kwargs, error)
        what = next(iter(kwargs))
        assert what in str(error) or "invalid name" in str(error), (kwargs, error)
    assert manager.client().mappers() == []  # nothing attached


def test_eager_must_be_a_bool(manager: RunningManager) -> None:
    """`eager="yes"` was taken for True (and `eager=""` for False): a bool it must be."""
    for eager in ("yes", "", 0, 1, None):
        with pytest.raises(TypeError, match="eager must be True or False"):
            membacking.attach(manager.runtime_dir, eager=eager)
    for eager in (True, False):
        with membacking.attach(manager.runtime_dir, name="flags", eager=eager) as memory:
            assert memory.eager is eager
    with membacking.attach(manager.runtime_dir, name="whole", reconnect_timeout=0) as memory:
        assert memory.read_at(0, 4) == bytes(4)
