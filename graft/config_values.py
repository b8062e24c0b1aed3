"""How a config value becomes its field's type, and config keys against field names: a leaf of
graft/config.py (which parses, overrides and validates the tree).

`coerce(key, value, type)` takes what YAML or `--set` gives (strings, numbers, lists, mappings) to the
field's annotated type — unions tried in order, `None` where allowed — or raises a UserError naming
the key. A key that is a Python keyword (`distill.lambda`) is held by the field with a trailing
underscore (`lambda_`): `key_of`, `field_of`, and `keyed` for a whole `dataclasses.asdict` tree.
"""

from __future__ import annotations

import keyword
import types
import typing

from graft.errors import UserError


def coerce(key: str, value, tp):
    """Return `value` as type `tp`, or raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        error = None
        for inner in (a for a in args if a is not type(None)):  # the first type that takes the value
            try:
                return coerce(key, value, inner)
            except UserError as e:
                error = error or e
        raise error
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping such as {{lm: 1}}, got {value!r}")
        return {coerce(key, k, key_type): coerce(key, v, value_type) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        return [coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UserError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"config key '{key}' expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def key_of(name: str) -> str:
    """A field's config key: the field `lambda_` is the key `lambda` (a Python keyword cannot name a field)."""
    return name[:-1] if isinstance(name, str) and name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def field_of(key: str) -> str:
    """The field behind a config key (`key_of`'s inverse)."""
    return key + "_" if keyword.iskeyword(key) else key


def keyed(value):
    """`dataclasses.asdict`'s output with config keys for field names, at every depth."""
    return {key_of(k): keyed(v) for k, v in value.items()} if isinstance(value, dict) else value
