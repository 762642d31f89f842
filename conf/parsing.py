"""The one config parser: a mapping (a Hydra section, a dict, ``meta.json``) -> a config dataclass.

``from_mapping(cls, data, "optim")`` builds ``cls`` from ``data``, recursing into dataclass fields and
``list`` / ``tuple`` / ``dict[str, X]`` / ``X | None`` values, and rejects an unknown key or a value of
the wrong type with one line naming the key (``optim.lr: expected a number, got 'fast'``). Ranges and
relations between keys are the dataclasses' own ``validate()``. It lives beside the YAML tree, below every
package (``lcv_train``, ``parallel``, ``data_loaders`` all import it; it imports none of them).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the constraint."""


def require(ok: bool, key: str, what: str) -> None:
    """Raise ``ConfigError("<key>: <what>")`` unless ``ok``: the one way config checks report."""
    if not ok:
        raise ConfigError(f"{key}: {what}")


def to_container(data: Any) -> Any:
    """An OmegaConf node as plain dicts and lists (interpolations resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return data
    if isinstance(data, (DictConfig, ListConfig)):
        return OmegaConf.to_container(data, resolve=True, throw_on_missing=False)
    return data


def from_mapping(cls, data: Any, prefix: str = "", error: type[Exception] = ConfigError):
    """Build dataclass ``cls`` from ``data`` (a mapping; a ``cls`` instance is returned as it is, ``None``
    gives the defaults), checking keys and value types; ``error`` is the exception raised, naming the key."""
    if isinstance(data, cls):
        return data
    data = to_container(data)
    if data is None:
        data = {}
    if not isinstance(data, typing.Mapping):
        raise error(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: str(k))
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise error(f"{join(unknown[0])}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(hints[k], v, join(k), error) for k, v in data.items()})


def _coerce(tp, v, key: str, error):
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in typing.get_args(tp):
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], v, key, error) if len(args) == 1 else v
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, v, key, error)
    if tp is dict:  # a section validated by its owner
        return v
    if origin is dict or origin is typing.Mapping:
        if not isinstance(v, typing.Mapping):
            raise error(f"{key}: expected a mapping, got {v!r}")
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, x, f"{key}.{k}", error) for k, x in v.items()}
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(v, (str, bytes)) or not isinstance(v, typing.Sequence):  # lists, tuples, OmegaConf lists
            raise error(f"{key}: expected a list, got {v!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                raise error(f"{key}: expected {len(args)} values, got {list(v)}")
            return tuple(_coerce(a, x, f"{key}[{i}]", error) for i, (a, x) in enumerate(zip(args, v)))
        inner = args[0] if args else Any
        out = [_coerce(inner, x, f"{key}[{i}]", error) for i, x in enumerate(v)]
        return tuple(out) if (origin or tp) is tuple else out
    if tp is bool:
        if not isinstance(v, bool):
            raise error(f"{key}: expected true/false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise error(f"{key}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise error(f"{key}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise error(f"{key}: expected a string, got {v!r}")
        return v
    return v
