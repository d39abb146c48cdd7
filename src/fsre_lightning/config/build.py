"""A config node checked against its schema dataclass: `build(schema, values, path)`.

OmegaConf merges the values into the structured schema, which rejects unknown keys (also those
added with `+`) and values of the wrong type; booleans are checked strictly (OmegaConf would
read yes, 1 or "on" as true). Building the dataclass then runs its range rules. Every failure
is one ConfigError naming the key by its full path (`model.network.num_heads`), the value and
what is allowed. `fsre_lightning.config` says which schema checks which group.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fsre_lightning.errors import ConfigError

_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def plain_get(node: DictConfig | ListConfig, key: Any) -> Any:
    """node[key] as plain values; an interpolation that cannot resolve here (a path with
    ${hydra:...} outside a run) or a `???` stays as written."""
    try:
        return plain_values(node[key])
    except OmegaConfBaseException:
        return node._get_node(key)._value()


def plain_values(node: Any) -> Any:
    """A config node as plain dicts and lists (see `plain_get`)."""
    if isinstance(node, DictConfig):
        return {str(key): plain_get(node, key) for key in node}
    if isinstance(node, ListConfig):
        return [plain_get(node, i) for i in range(len(node))]
    return node


def _nested(hint: Any) -> type | None:
    """The dataclass of a field typed `Schema` or `Schema | None`."""
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def _described(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return f"a list of {_TYPES.get(args[0], 'a value').split(' ', 1)[1]}s"
    if len(args) == 1:  # X | None
        return f"{_described(args[0])} or null"
    return _TYPES.get(hint, "a mapping" if _nested(hint) else str(hint))


@functools.cache
def _structured(schema: type) -> DictConfig:
    """The schema as an OmegaConf config (merging copies it, so one per schema serves all)."""
    return OmegaConf.structured(schema)


def build(schema: type, values: dict[str, Any], path: str = "") -> Any:
    """`schema(**values)` after OmegaConf's key and type checks; errors name `path.key`."""
    hints = typing.get_type_hints(schema)
    name = (lambda key: f"{path}.{key}" if path else key)  # noqa: E731
    kwargs: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints.get(key)
        if _nested(hint) and isinstance(value, dict):  # innermost first: errors name its keys
            kwargs[key] = build(_nested(hint), value, name(key))
            continue
        if bool in (hint, *typing.get_args(hint)) and not isinstance(value, bool) and not (
                value is None and type(None) in typing.get_args(hint)):
            # OmegaConf reads yes, 1 or "on" as true; a config means true or false
            raise ConfigError(name(key), value, _described(hint))
        own[key] = value
    try:
        typed = OmegaConf.merge(_structured(schema), own)
    except ConfigKeyError as err:
        allowed = sorted(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{name(str(err.key))} is not a known key (not read by the code): "
                          f"allowed keys of {path or 'the top level'} are {allowed}; check the "
                          "spelling (keys added with + are not read by anything)") from err
    except OmegaConfBaseException as err:
        key = re.split(r"[.\[]", str(err.full_key))[0]
        raise ConfigError(name(key), values.get(key), _described(hints.get(key))) from err
    for field in dataclasses.fields(schema):
        if field.name in kwargs:
            continue
        if OmegaConf.is_missing(typed, field.name):
            raise ConfigError(name(field.name), "???", "this key is required")
        kwargs[field.name] = plain_get(typed, field.name)
    try:
        return schema(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None
