"""``lcv-train pipeline=longcat``: the stage chain on the tiny model and the synthetic set, a few steps per
stage: killed mid-chain (kill -9), then the same command again, in-process, recording each stage's
weights as its first step sees them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lcv_train.errors import ConfigError
from tests.training._runs import env


def _overrides(tmp_path: Path) -> list[str]:
    return [f"run.root={tmp_path / 'runs'}", "run.name=lc", "logger=none", "model=tiny", "eval.at_end=false", f"synthetic.dir={tmp_path / 'data'}",
            "synthetic.n=8", "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=2",
            "trainer.sample_at_end=false", "trainer.device=cpu", "model.bsa.backend=torch",
            # the stage the test kills: long enough to be caught mid-way, a checkpoint every step
            'pipeline.overrides.multitask=["trainer.max_steps=8", "trainer.checkpoint_every=1"]']


def _pipeline(overrides: list[str]) -> dict:
    """What ``lcv-train pipeline=longcat <overrides>`` does, in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import conf
    from lcv_train.pipeline import run_pipeline

    def compose_stage(o):
        return OmegaConf.to_container(compose("train", overrides=o), resolve=True, throw_on_missing=True)

    command = ["pipeline=longcat", *overrides]
    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base=None):
        stages = GlobalHydra.instance().config_loader().get_group_options("stage")
        return run_pipeline(compose_stage(command), command, compose_stage, stages)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _latest_step(run_dir: Path) -> int:
    from lcv_train.pipeline import finished_step

    return finished_step(run_dir)


def test_the_chain_hands_weights_on_and_continues_after_a_kill(tmp_path, monkeypatch):
    """Catches: a stage starting from anything but the previous stage's final weights (here its EMA,
    trainer.init_weights=ema), a re-run that repeats finished stages or restarts the interrupted one, a
    stage handed on before it finished."""
    from lcv_train.checkpoints.ours import read_our_weights
    from lcv_train.lora import is_lora_name
    from lcv_train.training.trainer import Trainer

    root = tmp_path / "runs" / "lc"
    o = _overrides(tmp_path)
    # 1. The real command, killed (-9) once the third stage has a checkpoint.
    p = subprocess.Popen([sys.executable, "-m", "lcv_train", "pipeline=longcat", *o], cwd=tmp_path, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while _latest_step(root / "multitask") == 0:
        assert p.poll() is None, p.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "multitask never saved a checkpoint"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = _latest_step(root / "multitask")
    assert 1 <= killed_at < 8 and not (root / "sft").exists()
    assert [_latest_step(root / s) for s in ("image_pretrain", "video_pretrain")] == [2, 2]
    before = {s: (root / s / "metrics.jsonl").read_bytes() for s in ("image_pretrain", "video_pretrain")}
    resumed_weights = read_our_weights(root / "multitask", "model")[1]

    # 2. The same command again: record what each stage's first step starts from.
    first = {}
    fit = Trainer.fit

    def recording_fit(self):
        first[self.cfg.stage.name] = {k: v.detach().clone() for k, v in self._core_model().state_dict().items()}
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    summary = _pipeline(o)
    stages = [s["stage"] for s in summary["stages"]]  # the chain conf/pipeline/longcat.yaml lists
    assert stages[:5] == ["image_pretrain", "video_pretrain", "multitask", "sft", "sparse_ft"]
    assert [(s["status"], s["step"]) for s in summary["stages"]] == \
        [("done", 2), ("done", 2), ("ran", 8)] + [("ran", 2)] * (len(stages) - 3)
    # finished stages untouched, the interrupted one resumed from its own checkpoint, each step once
    assert list(first) == stages[2:]
    assert all((root / s / "metrics.jsonl").read_bytes() == b for s, b in before.items())
    assert _steps(root / "multitask") == list(range(1, 9))
    assert f"resumed from {root / 'multitask' / 'checkpoints'}" in (root / "multitask" / "logs" / "rank0.log").read_text()
    for k, v in resumed_weights.items():
        assert torch.equal(first["multitask"][k], v), k
    # each later stage's first step sees the previous stage's final (EMA) weights, exactly (a LoRA stage:
    # its base; the adapters are new)
    for previous, stage in zip(stages[2:], stages[3:]):
        final = read_our_weights(root / previous, "ema")[1]
        assert set(final) <= set(first[stage]) and all(is_lora_name(k) for k in set(first[stage]) - set(final))
        for k, v in final.items():
            assert torch.equal(first[stage][k], v), (stage, k)
    assert not torch.equal(first["sft"]["blocks.0.attn.qkv.weight"], first["sparse_ft"]["blocks.0.attn.qkv.weight"])
    # 3. Once more: everything is done, nothing runs.
    first.clear()
    assert [s["status"] for s in _pipeline(o)["stages"]] == ["done"] * len(stages) and not first


def test_pipeline_refuses_stage_and_unknown_stages(tmp_path):
    with pytest.raises(ConfigError, match=r"^pipeline: runs the stages of pipeline.stages .* drop stage=sft"):
        _pipeline(_overrides(tmp_path) + ["stage=sft"])
    with pytest.raises(ConfigError, match=r"^pipeline.stages\[1\]: no stage 'nope'"):
        _pipeline(_overrides(tmp_path) + ["pipeline.stages=[sft,nope]"])
    with pytest.raises(ConfigError, match=r"^pipeline.overrides.multitask: not a stage of pipeline.stages"):
        _pipeline(_overrides(tmp_path) + ["pipeline.stages=[sft]"])


def test_a_stage_stopped_by_a_signal_ends_the_chain_for_now(tmp_path, monkeypatch):
    """SIGTERM/SIGUSR1 (here: the stop request they set, at video_pretrain's first step) checkpoint the stage
    and end the command; the next stage does not start from a stage that has not finished."""
    from lcv_train.training.trainer import Trainer

    install = Trainer._install_signal_handlers

    def stop_video_pretrain(self):
        install(self)
        self._stop_requested = self.cfg.stage.name == "video_pretrain"

    monkeypatch.setattr(Trainer, "_install_signal_handlers", stop_video_pretrain)
    o = [x for x in _overrides(tmp_path) if not x.startswith("pipeline.overrides")]
    summary = _pipeline(o + ["pipeline.stages=[image_pretrain,video_pretrain,sft]"])
    assert [(s["stage"], s["status"], s["step"]) for s in summary["stages"]] == [
        ("image_pretrain", "ran", 2), ("video_pretrain", "stopped", 1)]
    root = tmp_path / "runs" / "lc"
    assert _latest_step(root / "video_pretrain") == 1 and not (root / "sft").exists()
