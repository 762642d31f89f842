"""Fast checks of the launch scripts' wiring and the Hydra launcher presets (no cluster, no training)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ._support import REPO, TORCHRUN_SH, TRAIN_SBATCH, launch_env


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = launch_env(LCV_DRY_RUN="1", **env)
    for k in ("LCV_NPROC_PER_NODE", "NPROC_PER_NODE", "LCV_NNODES", "NNODES", "SLURM_JOB_NUM_NODES",
              "LCV_RDZV_ENDPOINT", "MASTER_ADDR", "LCV_RUN_NAME", "OMP_NUM_THREADS", "SLURM_NODEID"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([str(TORCHRUN_SH), *args], env=e, capture_output=True, text=True, timeout=30)


def _torchrun_argv(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    return line.split("/launch/elastic.py ", 1)[1].split()


def test_torchrun_sh_single_node_defaults():
    argv = _torchrun_argv(_dry_run("trainer.max_steps=3"))
    opts = dict(zip(argv[0:12:2], argv[1:12:2]))
    assert opts == {"--nnodes": "1", "--nproc-per-node": "1", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "localhost:0", "--rdzv-id": "lcv-train", "--max-restarts": "3"}
    module = argv.index("-m")
    assert argv[module + 1] == "lcv_train"
    assert re.fullmatch(r"run\.name=\d{8}-\d{6}", argv[module + 2])  # one name for all ranks/restarts
    assert argv[module + 3:] == ["trainer.max_steps=3"]


def test_torchrun_sh_reads_gpus_env_and_keeps_a_given_run_name():
    r = _dry_run("run.name=mine", CUDA_VISIBLE_DEVICES="0,1,2")
    argv = _torchrun_argv(r)
    assert argv[argv.index("--nproc-per-node") + 1] == "3"
    assert argv[argv.index("-m") + 1:] == ["lcv_train", "run.name=mine"]
    assert "OMP_NUM_THREADS=" in r.stderr
    argv = _torchrun_argv(_dry_run(LCV_NPROC_PER_NODE="2", LCV_MAX_RESTARTS="0", LCV_RUN_NAME="n",
                                   LCV_TORCHRUN_ARGS="--monitor-interval 1"))
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[argv.index("--monitor-interval") + 1] == "1"
    assert "run.name=n" in argv


def test_torchrun_sh_several_nodes_need_endpoint_and_run_name():
    r = _dry_run(LCV_NNODES="2")
    assert r.returncode == 2 and "LCV_RDZV_ENDPOINT" in r.stderr
    r = _dry_run(LCV_NNODES="2", LCV_RDZV_ENDPOINT="node1:29400")
    assert r.returncode == 2 and "LCV_RUN_NAME" in r.stderr
    argv = _torchrun_argv(_dry_run(LCV_NNODES="2", LCV_RDZV_ENDPOINT="node1:29400", LCV_RUN_NAME="x",
                                   LCV_RDZV_FROM_SLURM="1", SLURM_NODEID="1"))
    assert argv[argv.index("--rdzv-endpoint") + 1] == "node1:29400"
    assert argv[argv.index("--rdzv-conf") + 1] == "join_timeout=600,is_host=0"


def _sbatch_directives() -> dict[str, str]:
    out = {}
    for line in TRAIN_SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            out[key] = value
    return out


def test_train_sbatch_defaults():
    d = _sbatch_directives()
    assert d["--ntasks-per-node"] == "1"
    assert d["--gpus-per-node"] == "8"
    assert "--requeue" in d and d["--signal"].startswith("B:USR1@")
    assert d["--open-mode"] == "append" and "%j" in d["--output"]
    subprocess.run(["bash", "-n", str(TRAIN_SBATCH)], check=True)


def test_train_sbatch_wiring_with_stub_slurm(tmp_path):
    """Run the batch script outside SLURM with stub scontrol/srun: what does it hand to srun?"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu017\\ngpu018\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUT/argv"\n'
                                  'env | grep -E "^(LCV_|TORCH_)" | sort > "$STUB_OUT/env"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_OUT=str(tmp_path),
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="vp", SLURM_JOB_NUM_NODES="2",
                     SLURM_JOB_NODELIST="gpu[017-018]", SLURM_CPUS_PER_TASK="64", SLURM_SUBMIT_DIR=str(REPO))
    for k in ("LCV_RUN_NAME", "LCV_RDZV_PORT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        env.pop(k, None)
    r = subprocess.run(["bash", str(TRAIN_SBATCH), "stage=video_pretrain", "trainer.resume=none"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    launcher = argv.index(str(REPO / "launch" / "torchrun.sh"))
    assert {"--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"} <= set(argv[:launcher])
    # The command line's trainer.resume wins over the script's default (given first).
    assert argv[launcher + 1:] == ["trainer.resume=auto", "stage=video_pretrain", "trainer.resume=none"]
    got = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert got["LCV_NNODES"] == "2"
    assert got["LCV_RDZV_ENDPOINT"] == f"gpu017:{20000 + 4242 % 20000}"
    assert got["LCV_RDZV_ID"] == "4242"
    assert got["LCV_RUN_NAME"] == "vp-4242"  # stable across requeues: same job id
    assert got["LCV_RDZV_FROM_SLURM"] == "1"
    assert int(got["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) > 30


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base=None):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", ["submitit_slurm", "lcv_slurm"])
def test_hydra_launcher_presets_compose(preset, tmp_path):
    from hydra.utils import instantiate

    cfg = _compose([f"hydra/launcher={preset}", f"run.root={tmp_path}"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)
    assert str(launcher.params["submitit_folder"]).startswith(str(tmp_path / "multirun"))


def test_lcv_slurm_preset_renders_a_torch_distributed_sbatch(tmp_path, monkeypatch):
    """Drive the real launcher up to submission and look at the sbatch script submitit would submit."""
    import submitit
    from hydra.core.utils import setup_globals
    from hydra.utils import instantiate

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    captured = {}

    def fake_map_array(self, fn, *args):
        captured["executor"] = self
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    setup_globals()
    cfg = _compose(["hydra/launcher=lcv_slurm", f"run.root={tmp_path}", "hydra.launcher.nodes=2"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    assert launcher.launch([["run.name=exp1"]], initial_job_idx=0) == []
    text = captured["executor"]._executor._make_submission_file_text("PYTHON -u -m submitit.core._submit F", "u")
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --nodes=2" in text and re.search(r"#SBATCH --signal=USR\d@180", text)
    assert "export MASTER_ADDR=$(scontrol show hostnames" in text
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in srun
    assert srun.endswith("lcv-task PYTHON -u -m submitit.core._submit F")
