"""One source of truth for defaults: ``conf/train.yaml`` holds exactly the dataclasses' defaults.

Bug caught: ``optim.lr`` was 1e-4 in ``OptimConfig`` but 1e-3 in the yaml, the EMA decay 0.999 vs 0.99 and
the sample steps / shift / guidance 50 / 12 / 4 vs 30 / 3 / 3, so a config built in Python trained
differently from the same config run from the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

import conf
from lcv_train.config import TrainConfig

ROOT = Path(conf.__file__).parent / "train.yaml"
GROUPS = {"model", "data", "vae", "text_encoder", "parallel", "stage", "logger"}  # choices with their own files
INTERPOLATED = {"run.name"}  # a timestamp (or $LCV_RUN_NAME) on the command line


def _plain(v):
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _differences(yaml, default, prefix) -> list[str]:
    out = []
    for key in sorted(set(yaml) | set(default)):
        name = f"{prefix}.{key}"
        if name in INTERPOLATED:
            continue
        if key not in yaml or key not in default:
            out.append(f"{name}: only in {'the dataclass' if key not in yaml else 'conf/train.yaml'}")
        elif isinstance(default[key], dict) and isinstance(yaml[key], dict):
            out += _differences(yaml[key], default[key], name)
        elif yaml[key] != default[key] or (type(yaml[key]) is bool) != (type(default[key]) is bool):
            out.append(f"{name}: conf/train.yaml has {yaml[key]!r}, the dataclass {default[key]!r}")
    return out


def test_root_yaml_equals_the_dataclass_defaults_for_every_key():
    yaml = OmegaConf.to_container(OmegaConf.load(ROOT), resolve=False)
    default = _plain(TrainConfig())
    owned = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in GROUPS]
    assert set(owned) <= set(yaml), f"sections missing from {ROOT}: {set(owned) - set(yaml)}"
    diffs = [d for section in owned for d in _differences(yaml[section], default[section], section)]
    assert not diffs, "\n".join(diffs)
