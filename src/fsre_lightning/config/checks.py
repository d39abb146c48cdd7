"""The vocabulary of range rules: each check raises ConfigError naming key, value and rule.

The config schemas (dataclasses beside the code they configure, see `fsre_lightning.config`)
write their `__post_init__` rules with these, so every message reads the same:
``model.network.num_heads=0 is not allowed: an integer >= 1``. Types (an integer, a number,
true or false) are already enforced by OmegaConf when a config is merged into its schema; the
checks here repeat the type test so that a direct Python call gets the same message.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fsre_lightning.errors import ConfigError

__all__ = ["arguments", "check_choice", "check_int", "check_number", "check_path",
           "deferring_probes", "is_int", "is_number", "probes_deferred", "raise_unless",
           "require"]

# Checks that need torch, timm or Lightning imported (an encoder's maps, probed on the meta device;
# the parameters of a callback or logger target) are put off inside `deferring_probes()`: the
# checks before a command's work (--cfg, usage errors, a sweep's members) answer in a second;
# the command checks the rest when its work starts.
_probes_deferred = False


@contextlib.contextmanager
def deferring_probes() -> Iterator[None]:
    """Checks inside skip what needs torch (the encoder probe), checking the rest."""
    global _probes_deferred
    previous, _probes_deferred = _probes_deferred, True
    try:
        yield
    finally:
        _probes_deferred = previous


def probes_deferred() -> bool:
    return _probes_deferred


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`: the form every range rule takes."""
    if not ok:
        raise ConfigError(key, value, allowed)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(lo: float | None, hi: float | None, strict: bool) -> str:
    parts = [f"{'>' if strict else '>='} {lo:g}" if lo is not None else "",
             f"<= {hi:g}" if hi is not None else ""]
    return " and ".join(p for p in parts if p)


def check_int(key: str, value: Any, lo: int | None = None, hi: int | None = None,
              nullable: bool = False, what: str | None = None) -> None:
    """`value` is an integer in [lo, hi] (or None when `nullable`)."""
    if value is None and nullable:
        return
    bounds = _bounds(lo, hi, strict=False)
    text = what or ("an integer" + (f" {bounds}" if bounds else "") + (" or null" if nullable
                                                                       else ""))
    require(is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi),
            key, value, text)


def check_number(key: str, value: Any, lo: float | None = None, hi: float | None = None,
                 strict: bool = False, nullable: bool = False, what: str | None = None) -> None:
    """`value` is a finite number >= lo (> lo when `strict`) and <= hi (or None)."""
    if value is None and nullable:
        return
    bounds = _bounds(lo, hi, strict)
    text = what or (f"must be {bounds}: a number" if bounds else "a number")
    ok = is_number(value) and (lo is None or (value > lo if strict else value >= lo)) and (
        hi is None or value <= hi)
    require(ok, key, value, text + (" or null" if nullable and not what else ""))


def check_choice(key: str, value: Any, choices: Sequence[Any], nullable: bool = False) -> None:
    """`value` is one of `choices` (of the same type: True is not 1)."""
    if value is None and nullable:
        return
    ok = any(value == c and type(value) is type(c) for c in choices)
    require(ok, key, value, f"one of {list(choices)}" + (" or null" if nullable else ""))


def check_path(key: str, value: Any, nullable: bool = False) -> None:
    """A file or folder: a non-empty string or path (or None)."""
    if value is None and nullable:
        return
    require(isinstance(value, os.PathLike) or (isinstance(value, str) and bool(value)), key,
            value, "a path (a non-empty string)" + (" or null" if nullable else ""))


def check_writable(key: str, value: Any, folder: bool = False) -> None:
    """An output path (a file, or a folder with `folder=True`) that can be written: its nearest
    existing ancestor is a writable folder. Checked before the work, so a long evaluation or
    export is not lost at its last step."""
    check_path(key, value)
    path = Path(value).expanduser().absolute()
    require(not path.is_dir() or folder, key, value, "a file path, not a folder")
    require(not (folder and path.exists() and not path.is_dir()), key, value,
            "a folder, not a file")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), key, value,
            f"a path that can be written ({existing} is not a writable folder)")


def arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's arguments as its schema takes them: sequences (tuples, OmegaConf lists)
    as lists; `self`, `__class__` and `**kwargs` left out (call with `locals()`)."""
    return {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str | bytes) else v
            for k, v in values.items() if k not in ("self", "__class__", "kwargs")}


def raise_unless(ok: bool, message: str) -> None:
    """For rules that involve two keys: the message names both."""
    if not ok:
        raise ConfigError(message)
