"""The newcomer's path: what the README shows is what the commands do, and the first hour reads right.

Each test names the defect it catches (issue 9): synthetic shards that the printed line cannot train on,
log lines written onto the progress bar, a bar one step behind, W&B's history tables and torch's
single-process warning at the end, run directories left by rejected commands, a planner that silently
plans a toy clip for the 13.6B model, README figures that are not the command's output, a checkpoint
message that always names longcat-13.6b, the export's prog name and file mode, the model snippet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.training._runs import REPO, lcv_train

README = (REPO / "README.md").read_text()


def test_synth_output_trains_with_the_line_synth_prints(tmp_path, capsys):
    """`lcv-data synth` with its defaults, then exactly the line it prints: every clip is usable (no skip,
    no warning), the trainer makes no synthetic set of its own, W&B ends with one line and torch's
    single-process checkpoint warning is not shown."""
    from data_loaders.cli import main as lcv_data

    shards = tmp_path / "shards"
    assert lcv_data(["synth", "--out", str(shards), "--n", "16"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == f"train on it: lcv-train data.shards=[{shards}]"
    unused = tmp_path / "synthetic-cache"
    args = shlex.split(line.removeprefix("train on it: lcv-train"))
    p = lcv_train(args + [f"run.root={tmp_path / 'out'}", "run.name=r", "trainer.max_steps=2", "sample.steps=1",
                          f"synthetic.dir={unused}", "logger=wandb"], cwd=tmp_path)
    out = p.stdout + p.stderr
    assert not unused.exists(), "given data.shards, the trainer must not make its own synthetic set"
    last = json.loads((tmp_path / "out" / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["data/skipped"] == 0 and last["data/read"] >= 16
    assert "WARNING" not in out and "Warning" not in out, out
    assert "Run history" not in out and "Run summary" not in out, out
    assert len(re.findall(r"^W&B: offline run in \S+", p.stderr, re.M)) == 1, p.stderr


def test_synth_train_command_adds_what_differs_from_the_default():
    from data_loaders.synthetic import train_command

    assert train_command("s", [9, 16], 32, 32, 8.0) == "lcv-train data.shards=[s]"
    assert (train_command("s", [6, 8], 16, 24, 4.0, image_fraction=0.25)
            == "lcv-train data.shards=[s] data.buckets=[[5,16,24],[1,16,24]] data.fps=4")


def test_log_lines_go_above_the_bar_and_the_bar_shows_its_steps_loss(tmp_path, monkeypatch, capsys):
    """Catches log lines printed onto the bar's line, and a bar showing the previous step's loss."""
    from lcv_train.training.metrics import MetricsLogger, setup_logging

    monkeypatch.setenv("LCV_NO_PROGRESS", "0")
    disabled = logging.root.manager.disable  # another test's CLI may have called logging.disable
    logging.disable(logging.NOTSET)
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # what Hydra installs: INFO to the console
    console.setLevel(logging.INFO)
    root.addHandler(console)
    try:
        setup_logging(tmp_path, 0)
        ml = MetricsLogger(SimpleNamespace(kind="none"), tmp_path, 0, total_steps=2, start_step=0, config_dict={})
        ml.bar.mininterval, ml.bar.miniters = 0, 1  # redraw on every update
        ml.log(1, {"train/loss": 1.5})
        logging.getLogger("lcv_train").info("step 1 loss 1.50000")
        ml.log(2, {"train/loss": 0.25})
        ml.close()
    finally:
        logging.disable(disabled)
        for h in list(root.handlers):
            if h is console or getattr(h, "_lcv", False):
                root.removeHandler(h)
                h.close()
    err = capsys.readouterr().err
    screens = [s for line in err.split("\n") for s in line.split("\r") if s.strip()]
    logs = [s for s in screens if "step 1 loss" in s]
    assert logs == ["step 1 loss 1.50000"], screens  # a line of its own, not glued to the bar
    assert all("loss=1.5000" in s for s in screens if "1/2" in s) and any("1/2" in s for s in screens), screens
    assert all("loss=0.2500" in s for s in screens if "2/2" in s) and any("2/2" in s for s in screens), screens


def test_rejected_command_leaves_no_run_directory(tmp_path):
    p = lcv_train(["optim.lr=-1", f"run.root={tmp_path / 'out'}"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip() == "lcv-train: error: optim.lr: must be > 0, got -1.0"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoint_of_another_size_names_the_fitting_model(tmp_path):
    """Catches the mismatch message that says `use model=longcat-13.6b` whatever the checkpoint's size;
    and the exported files' mode (safetensors writes 0600)."""
    from lcv_train.checkpoints import check_published_dit, export_published_dit
    from lcv_train.errors import CheckpointError
    from lcv_train.model import LongCatDiT

    for name, overrides in (("tiny", {}), ("deeper", {"depth": 3, "num_heads": 4})):
        model = LongCatDiT.from_preset("tiny", **overrides)
        export_published_dit(model.state_dict(), model.config, tmp_path / name)
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "tiny" / "dit").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    with torch.device("meta"):
        small = LongCatDiT.from_preset("small")
        tiny = LongCatDiT.from_preset("tiny")
    with pytest.raises(CheckpointError, match=r"hidden_size=64 but model.hidden_size=256; use model=tiny$"):
        check_published_dit(small, tmp_path / "tiny")
    with pytest.raises(CheckpointError, match=r"depth=3 but model.depth=2; use model.depth=3 model.num_heads=4$"):
        check_published_dit(tiny, tmp_path / "deeper")


def test_lcv_export_help_names_the_command(capsys):
    from lcv_train.export import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: lcv-export ")


def test_lcv_plan_plans_a_real_clip_or_refuses(capsys):
    """Catches the 13.6B plan of the embedded default's 9x32x32 clip (12 tokens per sample)."""
    from lcv_train import planner

    assert planner.main(["model=longcat-13.6b", "parallel=fsdp", "world_size=64", "json=true"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["bucket"] == [93, 480, 832] and p["tokens_per_sample"] == 37440
    assert "published 480p 93-frame bucket" in p["notes"][0]
    assert planner.main(["parallel=fsdp", "world_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lcv-plan: data.bucket: give the clip to plan"), err


def test_readme_lcv_plan_block_is_the_commands_output(capsys):
    """Every figure of the README's lcv-plan example is what the command shown prints."""
    from lcv_train import planner

    block = re.search(r"```bash\n\$ (lcv-plan [^\n]+)\n(.*?)```", README, re.S)
    assert block, "the README's lcv-plan example is missing"
    assert planner.main(shlex.split(block.group(1))[1:]) == 0
    assert capsys.readouterr().out == block.group(2)


def test_readme_model_snippet_runs_with_the_shapes_it_gives():
    snippet = re.search(r"```python\n(import torch\nfrom lcv_train.model import LongCatDiT\n.*?)```", README, re.S)
    assert snippet, "the README's model snippet is missing"
    scope: dict = {}
    exec(snippet.group(1), scope)  # noqa: S102 - our own README
    assert scope["v"].shape == scope["latents"].shape
    assert tuple(scope["v_noisy"].shape) == (2, 16, 2, 8, 8)
