"""The one config parser (``conf.parsing.from_mapping``): every section of every package goes through it,
and a wrong key or value type is one line naming the key, in the caller's error class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from conf.parsing import ConfigError, from_mapping


@dataclass
class Inner:
    ratio: float = 1.0
    tags: List[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int = 1
    shape: tuple[int, int] = (1, 1)
    name: Optional[str] = None
    on: bool = False
    parts: Dict[str, Inner] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


class MyError(ConfigError):
    pass


def test_builds_nested_values():
    o = from_mapping(Outer, {"steps": 3, "shape": [2, 4], "parts": {"a": {"ratio": 2, "tags": ["x"]}},
                             "inner": None, "name": None})
    assert o == Outer(steps=3, shape=(2, 4), parts={"a": Inner(2.0, ["x"])})
    assert isinstance(o.parts["a"].ratio, float) and from_mapping(Outer, None) == Outer()


@pytest.mark.parametrize("data,message", [
    ({"stepz": 1}, "outer.stepz: unknown key (known: inner, name, on, parts, shape, steps)"),
    ({"steps": 1.5}, "outer.steps: expected an integer, got 1.5"),
    ({"steps": True}, "outer.steps: expected an integer, got True"),
    ({"shape": [1, 2, 3]}, "outer.shape: expected 2 values, got [1, 2, 3]"),
    ({"on": "yes"}, "outer.on: expected true/false, got 'yes'"),
    ({"parts": {"a": {"ratio": "x"}}}, "outer.parts.a.ratio: expected a number, got 'x'"),
    ({"inner": {"tags": "x"}}, "outer.inner.tags: expected a list, got 'x'"),
    ([1], "outer: expected a mapping, got [1]"),
])
def test_errors_name_the_key_in_the_callers_class(data, message):
    with pytest.raises(MyError) as e:
        from_mapping(Outer, data, "outer", error=MyError)
    assert str(e.value) == message


def test_every_package_uses_it():
    """data_loaders and parallel parse with it too (and raise subclasses of the same ConfigError)."""
    from data_loaders import to_data_config
    from data_loaders.config import DataConfigError
    from lcv_train.encoders import build_video_codec
    from lcv_train.errors import ConfigError as TrainConfigError

    assert TrainConfigError is ConfigError and issubclass(DataConfigError, ConfigError)
    with pytest.raises(DataConfigError, match=r"^data.filters.min_motion: expected a number, got 'fast'$"):
        to_data_config({"shards": ["x"], "filters": {"min_motion": "fast"}})
    with pytest.raises(ConfigError, match=r"^vae.tiling: expected true/false, got 'yes'$"):
        build_video_codec({"kind": "wan2.1", "path": "/x", "tiling": "yes"})
