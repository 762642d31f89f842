"""Configuration: the composed tree matches the dataclasses, and bad values stop at start-up with one
line naming the key."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import conf
from lcv_train.cli import run
from lcv_train.config import TrainConfig, train_config_from_dict
from lcv_train.errors import ConfigError
from tests.training._runs import REPO, env

CONF = str(Path(conf.__file__).parent)


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("train", overrides=list(overrides))


def test_default_tree_is_valid_and_complete():
    cfg = composed()
    d = OmegaConf.to_container(cfg, resolve=True)
    tc = train_config_from_dict(d)
    assert tc.model.hidden_size == 128 and tc.synthetic.enabled and tc.parallel.name == "single"
    # Every dataclass field is spelled out in the yaml, so any key can be overridden from the command line.
    for f in dataclasses.fields(TrainConfig):
        sub = getattr(tc, f.name)
        if dataclasses.is_dataclass(sub):
            missing = {g.name for g in dataclasses.fields(sub)} - set(d[f.name])
            assert not missing, f"{f.name}: {missing} not in conf/"


@pytest.mark.parametrize("preset", ["tiny", "small", "longcat-13.6b"])
def test_model_presets_compose(preset):
    tc = train_config_from_dict(OmegaConf.to_container(composed(f"model={preset}"), resolve=True))
    assert tc.model.depth == {"tiny": 2, "small": 4, "longcat-13.6b": 48}[preset]


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"),
    ("model.hidden_size=65", "model.hidden_size"),
    ("model.patch_size=[2,2,2]", "model.patch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("schedule.kind=exp", "schedule.kind"),
    ("ema.decay=1.5", "ema.decay"),
    ("parallel.cp=0", "parallel.cp"),
    ("trainer.grad_accum=two", "trainer.grad_accum"),
    ("trainer.sample_every=-1", "trainer.sample_every"),
    ("parallel.cp_split_hw=[2,2]", "parallel.cp_split_hw"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        run(composed(override))
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_bucket_that_does_not_fit_the_patch(tmp_path):
    with pytest.raises(Exception) as e:
        run(composed(f"run.root={tmp_path}", "logger=none", f"synthetic.dir={tmp_path}/d", "synthetic.n=8",
                     "synthetic.frames=5", "synthetic.height=16", "synthetic.width=16", "data.buckets=[[5,18,18]]"))
    assert "data.buckets" in str(e.value) and "\n" not in str(e.value)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        run(composed(f"run.root={tmp_path}", "logger=none", "vae=wan2.1", f"vae.path={tmp_path}/LongCat-Video"))
    assert "LongCat-Video" in str(e.value)


def test_init_from_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        run(composed(f"run.root={tmp_path}", "logger=none", f"trainer.init_from={tmp_path}/nowhere"))


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lcv_train", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=120)


def test_cli_help_cfg_and_one_line_errors(tmp_path):
    p = cli("--help", cwd=tmp_path)
    assert p.returncode == 0
    assert p.stdout.startswith("lcv-train: training for LongCat-Video")
    assert "model: demo, longcat-13.6b, small, tiny" in p.stdout
    p = cli("--cfg", "job", "model=small", "optim.lr=3e-4", cwd=tmp_path)
    assert p.returncode == 0
    job = OmegaConf.create(p.stdout)
    assert job.model.hidden_size == 256 and job.optim.lr == 3e-4
    p = cli("optim.lr=-1", f"run.root={tmp_path}", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "lcv-train: error: optim.lr: must be > 0, got -1.0"
    # Hydra's own refusal is a user error too: exit 2 (exit 1 would make torchrun restart the job).
    p = cli("trainer.no_such_key=1", cwd=tmp_path)
    assert p.returncode == 2 and "no_such_key" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "lcv-train: error: the command line was refused (Hydra's message above)"

