"""The daemon's TOML configuration file (`membacking manager run --config FILE`).

`load_config` returns settings keyed like the command-line options; every error names the file,
the key and the reason. Options given on the command line override the file.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from .. import units
from ..errors import MembackingError

#: The shortest --unmap-timeout: twice a mapper's lease (membacking.mapper.lease.LEASE), so a
#: mapper stopped long enough to be evicted always finds its lease run out when it runs again
#: (and drops its mappings before it accesses any).
MIN_UNMAP_TIMEOUT = 1.0


class ConfigError(MembackingError):
    """The configuration file is missing, not TOML, or has a bad key."""


_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")


def _shown(value: Any) -> str:
    """A value as the file spells it (TOML's `true`, not Python's `True`)."""
    return ("true" if value else "false") if type(value) is bool else repr(value)


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"must be a whole number of at least {minimum}, got {_shown(value)}")
    return value


def _size(key: str, value: Any) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str):
        return units.parse_size(value)
    raise ValueError(f"must be a size (integer or string like '64M'), got {_shown(value)}")


def _choice(options: tuple[str, ...]) -> Any:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {_shown(value)}")
        return str(value)

    return check


def _at_least(low: float) -> Any:
    """A number of at least `low`: one message whatever is wrong with it (as the same option
    says on the command line)."""

    def check(key: str, value: Any) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < low:
            raise ValueError(f"must be a number of at least {low:g}, got {_shown(value)}")
        return float(value)

    return check


def _flag(key: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("must be true or false")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {_shown(value)}")
    return value


#: The largest valid uid or gid: (uid_t)-1, 4294967295, means "no id" to the kernel.
MAX_ID = 2**32 - 2


def check_id(value: Any) -> int:
    """A uid or gid the kernel can hold, else ValueError (the same check for the command line
    and for the configuration file)."""
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError(f"{value!r} is not a uid/gid: it must be an integer from 0 to {MAX_ID}")
    return value


def _ids(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of uids/gids, got {_shown(value)}")
    return tuple(check_id(v) for v in value)


def _port(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        raise ValueError(f"must be a number, not a string: write {value.strip()} without quotes")
    if type(value) is not int or not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port number (0-65535), got {_shown(value)}")
    return value


def _absolute(key: str, value: Any) -> Path:
    path = Path(_string(key, value))
    if not path.is_absolute():
        # the daemon would take it from its working directory, and each client command that
        # reads this file from its own: they would not meet
        raise ValueError(f"must be an absolute path, got {_shown(value)}")
    return path


_TOP: dict[str, Any] = {
    "runtime_dir": _absolute,
    "address_space": lambda k, v: units.check_address_space(_size(k, v)),
    "unmap_timeout": _at_least(MIN_UNMAP_TIMEOUT),
    "evict_kill": _flag,
    "prealloc": _flag,
    "log_level": _choice(_LOG_LEVELS),
    "log_format": _choice(_LOG_FORMATS),
    "metrics_port": _port,
    "metrics_addr": _string,
    "allow_uids": _ids,
    "allow_gids": _ids,
    "state_dir": lambda k, v: Path(_string(k, v)),
    "no_state": lambda k, v: _flag(k, v),
    "keep_state": lambda k, v: _flag(k, v),
    "fd_store": _choice(("auto", "on", "off")),
}
_LIMITS = ("max_mappers", "max_regions", "max_fds_per_mapper")
_REGION_KEYS = {
    "name",
    "gpa",
    "size",
    "readonly",
    "priority",
    "file",
    "hugetlb",
    "private",
    "disabled",
}


def _region(index: int, table: Any) -> dict[str, Any]:
    where = f"regions[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"key {where!r}: must be a table with name, gpa and size")
    unknown = set(table) - _REGION_KEYS
    if unknown:
        raise ConfigError(f"key '{where}.{sorted(unknown)[0]}': unknown key")
    for key in ("name", "gpa", "size"):
        if key not in table:
            raise ConfigError(f"key '{where}.{key}': missing")
    try:
        name = units.check_name(_string("name", table["name"]))
    except ValueError as exc:
        raise ConfigError(f"key '{where}.name': {exc}") from None
    values = []
    for key in ("gpa", "size"):
        try:
            value = _size(key, table[key])
        except ValueError as exc:
            raise ConfigError(f"key '{where}.{key}': {exc}") from None
        try:
            units.check_pages(value, key, nonzero=key == "size")
        except ValueError as exc:
            raise ConfigError(f"key '{where}.{key}': {exc}") from None
        values.append(value)
    out: dict[str, Any] = {"name": name, "gpa": values[0], "size": values[1]}
    for flag in ("readonly", "hugetlb", "private", "disabled"):
        if flag in table:
            if type(table[flag]) is not bool:
                raise ConfigError(f"key '{where}.{flag}': must be true or false")
            out[flag] = table[flag]
    if "priority" in table:
        if type(table["priority"]) is not int or not 0 <= table["priority"] <= 255:
            raise ConfigError(f"key '{where}.priority': must be an integer from 0 to 255")
        out["priority"] = table["priority"]
    if "file" in table:
        try:
            out["file"] = str(Path(_string("file", table["file"])).absolute())
        except ValueError as exc:
            raise ConfigError(f"key '{where}.file': {exc}") from None
    return out


def parse_config(data: dict[str, Any]) -> dict[str, Any]:
    """Validate a parsed TOML document; raises ConfigError naming the key (without the file)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TOP:
            try:
                out[key] = _TOP[key](key, value)
            except ValueError as exc:
                raise ConfigError(f"key {key!r}: {exc}") from None
        elif key == "limits":
            if not isinstance(value, dict):
                raise ConfigError("key 'limits': must be a table")
            for lkey, lvalue in value.items():
                if lkey not in _LIMITS:
                    raise ConfigError(f"key 'limits.{lkey}': unknown key")
                try:
                    out[lkey] = _positive_int(lkey, lvalue)
                except ValueError as exc:
                    raise ConfigError(f"key 'limits.{lkey}': {exc}") from None
        elif key == "regions":
            if not isinstance(value, list):
                raise ConfigError("key 'regions': must be an array of tables ([[regions]])")
            out["regions"] = [_region(i, table) for i, table in enumerate(value)]
            seen: dict[str, int] = {}
            for i, region in enumerate(out["regions"]):
                if region["name"] in seen:
                    raise ConfigError(
                        f"key 'regions[{i}].name': {region['name']!r} is already the name of "
                        f"regions[{seen[region['name']]}]"
                    )
                seen[region["name"]] = i
        else:
            raise ConfigError(f"key {key!r}: unknown key")
    return out


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate a configuration file."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
