"""The package's error types: what a command reports as one line instead of a traceback.

Every mistake a user can make (a config value out of range, a missing or damaged file, a
checkpoint of another model, a NaN the policy says to stop on) is a `UserError`. The
commands print it as ``fsre_lightning.<command>: error: <message>`` and exit with status 2
(`fsre_lightning.runtime`); anything else is a bug and keeps its traceback.

This module depends on nothing but the standard library, so that every layer (the KITTI
layout helpers, the networks, the entry points) can raise these types.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in the user's config, data or files; the message says what to do.

    `exit_status`: what the command exits with after printing the one line (2, as argparse
    does for a command used wrongly; a subclass for a run that stopped on its own rules sets 1).
    """

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A config value outside its allowed range, of the wrong type, or an unknown key.

    Built with `key`, `value` and `allowed`, the message reads ``key=value is not allowed:
    allowed``; `under(prefix)` names the key by its full path (``model.network.num_heads``)
    once the caller knows which config group the value came from.
    """

    def __init__(self, message_or_key: str, value: Any = None, allowed: str | None = None
                 ) -> None:
        self.key = message_or_key if allowed is not None else None
        self.value, self.allowed = value, allowed
        super().__init__(message_or_key if allowed is None
                         else f"{message_or_key}={value!r} is not allowed: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with the key named from the config root, e.g. ``data.height``."""
        if self.key is None or not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


class DataError(UserError):
    """The data on disk does not match the config: missing files, empty or malformed splits."""


def first_line(err: BaseException) -> str:
    """What a one-line report quotes of a library's exception: the first non-empty line of its
    message (torch and timm add pages of advice), or the exception type's name."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
