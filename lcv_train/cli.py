"""``lcv-train``: the Hydra entry point (config tree in the ``conf`` package).

Errors the user can fix (a wrong config value, a missing weight file, a checkpoint that does not match)
are printed as one line naming the key or file, with exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from lcv_train.errors import CheckpointError, ConfigError, TrainingDiverged


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError]
    try:
        from data_loaders.config import DataConfigError, DataError

        errors += [DataConfigError, DataError]
    except ImportError:
        pass
    return tuple(errors)


def run(cfg: DictConfig) -> dict:
    from lcv_train.config import train_config_from_dict
    from lcv_train.training.trainer import Trainer

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if container.get("pipeline") is not None:  # pipeline=<name>: a chain of stage runs (lcv_train/pipeline.py)
        return _run_pipeline(container)
    train_cfg = train_config_from_dict(container)
    return Trainer(train_cfg, container).fit()


def _run_pipeline(container: dict) -> dict:
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lcv_train.pipeline import run_pipeline

    def compose_stage(overrides: list[str]) -> dict:
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=True, throw_on_missing=True)

    stages = GlobalHydra.instance().config_loader().get_group_options("stage")
    return run_pipeline(container, list(HydraConfig.get().overrides.task), compose_stage, stages)


def _fail(message: str) -> None:
    """A user error: one line, exit 2, and (several ranks) the same on every node, no elastic restart."""
    from lcv_train.multinode import CONFIG_ERROR, abort_job

    if not abort_job(message, CONFIG_ERROR):  # True: launch/torchrun.sh prints it, once per node
        print(f"lcv-train: error: {message}", file=sys.stderr)
    sys.exit(2)


# What Hydra and the trainer's start-up write into a run directory before the first step.
_STARTUP_FILES = {".hydra", "lcv-train.log", "logs", "config.yaml"}


def _remove_unused_run_dir() -> None:
    """A rejected command leaves no ``outputs/<timestamp>/`` behind: Hydra makes the run directory before
    the config is validated, so remove it when it holds nothing but start-up files (never a directory with
    checkpoints, metrics or anything else; only rank 0 does it)."""
    import os
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if os.environ.get("RANK", "0") != "0" or not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= _STARTUP_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


def _mean(xs):
    return sum(xs) / max(len(xs), 1)


_task_started = False  # set once Hydra has composed the config and handed it to the task


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    try:
        summary = run(cfg)
    except _user_errors() as e:
        _remove_unused_run_dir()
        _fail(str(e))
    except KeyboardInterrupt:
        print("lcv-train: interrupted; every published checkpoint on disk is complete", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # omegaconf's MissingMandatoryValue and friends: name the key
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, OmegaConfBaseException):
            _remove_unused_run_dir()
            _fail(str(e).splitlines()[0])
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    for st in summary.get("stages", []):  # pipeline=: one line per stage
        print(f"lcv-train: stage {st['stage']}: {st['status']} (step {st['step']} of {st['max_steps']}), "
              f"{st['run_dir']}")
    hist = summary.get("history") or []
    if hist:
        k = min(10, len(hist))
        print(f"lcv-train: steps {hist[0]['step']}..{hist[-1]['step']}: loss {_mean([h['loss'] for h in hist[:k]]):.4f} "
              f"(first {k}) -> {_mean([h['loss'] for h in hist[-k:]]):.4f} (last {k})")
    print(f"lcv-train: run directory {summary['run_dir']}")
    if summary.get("sample"):
        print(f"lcv-train: sample video {summary['sample']}")


def train_main() -> None:
    from lcv_train.multinode import hydra_rank_overrides

    sys.argv += hydra_rank_overrides(sys.argv[1:])  # ranks > 0 leave the run folder's shared files alone
    try:
        _hydra_main()
    except SystemExit as e:
        # Hydra refused the command line (an unknown key, a bad override) before the task ran: it has
        # printed why and exits 1, which torchrun would take for a fault and retry. It is a user error.
        if e.code == 1 and not _task_started:
            _fail("the command line was refused (Hydra's message above)")
        raise


if __name__ == "__main__":
    train_main()
