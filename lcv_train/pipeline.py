"""``lcv-train pipeline=<name>``: a chain of training stages run one after the other.

Each stage is an ordinary ``lcv-train stage=<stage>`` run with its own run directory,
``<run.root>/<run.name>/<stage>/``, composed from the same command line (minus ``pipeline=``) plus
``stage=<stage>`` and the stage's own ``pipeline.overrides.<stage>``; every stage after the first starts
from the previous stage's final weights (``trainer.init_from=<previous stage's run directory>``, its
latest checkpoint; ``trainer.init_weights`` says EMA or model weights). The first stage takes the command
line's ``trainer.init_from``, if any.

Re-running the same command continues the chain: a stage whose latest checkpoint is at its
``trainer.max_steps`` is done and skipped; the first one that is not resumes from its own checkpoint
(``trainer.resume=auto``) or starts; a stage stopped by a signal (checkpoint saved) ends the pipeline for
now, so the next run continues it. A stage's weights are never handed on before it has finished.

The stage list and per-stage overrides are config (``conf/pipeline/*.yaml``)::

    pipeline:
      stages: [image_pretrain, video_pretrain, multitask, sft, sparse_ft]
      overrides:
        sft: ["data.subsets.curated.shards=[/data/curated]"]
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lcv_train.errors import ConfigError

log = logging.getLogger("lcv_train.pipeline")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=list)  # stage config names (conf/stage/<name>.yaml), in order
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage name -> extra overrides for that stage

    def validate(self, known: list[str] | None = None) -> "PipelineConfig":
        if not self.stages:
            raise ConfigError("pipeline.stages: empty; list the stages to run, e.g. [video_pretrain, sft]")
        for i, name in enumerate(self.stages):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"pipeline.stages[{i}]: expected a stage name, got {name!r}")
            if known is not None and name not in known:
                raise ConfigError(f"pipeline.stages[{i}]: no stage {name!r} (known: {', '.join(sorted(known))})")
            if self.stages.index(name) != i:
                raise ConfigError(f"pipeline.stages[{i}]: {name!r} is listed twice (each stage has one run directory)")
        for name, extra in self.overrides.items():
            if extra and name not in self.stages:
                raise ConfigError(f"pipeline.overrides.{name}: not a stage of pipeline.stages ({', '.join(self.stages)})")
            if not isinstance(extra, (list, tuple)) or not all(isinstance(o, str) for o in extra):
                raise ConfigError(f"pipeline.overrides.{name}: expected a list of overrides (strings), got {extra!r}")
        return self


def pipeline_config(d: dict) -> PipelineConfig:
    from conf.parsing import from_mapping

    return from_mapping(PipelineConfig, d, "pipeline")


def _key(override: str) -> str:
    """The key an override sets (``+a.b=1``, ``a.b=1``, ``~a.b`` -> ``a.b``; ``stage=sft`` -> ``stage``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).key_or_group


def stage_overrides(command_line: list[str], stage: str, run_root: Path, previous: Path | None,
                    extra: list[str]) -> list[str]:
    """The overrides that compose ``stage``'s config: the command line (without ``pipeline...``), then the
    stage, its run directory, its starting weights and its own extras; a later override of a key replaces
    an earlier one."""
    mine = [f"stage={stage}", f"run.root={run_root}", f"run.name={stage}"]
    if previous is not None:
        mine.append(f"trainer.init_from={previous}")
    merged: dict[str, str] = {}
    for o in [*command_line, *mine, *extra]:
        key = _key(o)
        if key == "pipeline" or key.startswith("pipeline."):  # the chain's own settings
            continue
        merged.pop(key, None)  # the later one wins, in its own position
        merged[key] = o
    return list(merged.values())


def finished_step(run_dir: Path) -> int:
    """The step of the run's latest published checkpoint (0: none)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return 0
    meta = run_dir / "checkpoints" / pointer.read_text().strip() / "meta.json"
    if not meta.is_file():
        return 0
    return int(json.loads(meta.read_text()).get("step", 0))


def run_pipeline(container: dict, command_line: list[str], compose: Callable[[list[str]], dict],
                 stage_names: list[str] | None = None) -> dict:
    """Run (or continue) the chain ``container["pipeline"]`` describes.

    ``container``: the composed, resolved config of the ``pipeline=`` command; ``command_line``: its
    overrides; ``compose(overrides)``: the resolved config (a plain dict) of ``lcv-train <overrides>``;
    ``stage_names``: the stage configs that exist (for the error on an unknown one). Returns a summary:
    the pipeline directory, each stage's status (``done``, ``ran``, ``stopped``) and run directory."""
    from lcv_train.config import train_config_from_dict
    from lcv_train.training.trainer import Trainer

    pcfg = pipeline_config(container.get("pipeline")).validate(stage_names)
    given = [o for o in command_line if _key(o) == "stage"]
    if given:
        raise ConfigError(f"pipeline: runs the stages of pipeline.stages ({', '.join(pcfg.stages)}); drop {given[0]} "
                          f"from the command line, or give a stage its own settings with pipeline.overrides.<stage>")
    root = Path(container["run"]["root"]).expanduser() / container["run"]["name"]
    # Every stage's config is composed and validated before anything trains: a mistake in the last stage's
    # settings stops the command now, not hours later.
    plan, previous = [], None
    for stage in pcfg.stages:
        overrides = stage_overrides(command_line, stage, root, previous, pcfg.overrides.get(stage, []))
        stage_dict = compose(overrides)
        plan.append((stage, stage_dict, train_config_from_dict(stage_dict)))
        previous = root / stage
    summary = {"run_dir": str(root), "stages": [], "history": []}
    for i, (stage, stage_dict, cfg) in enumerate(plan):
        run_dir, total = root / stage, cfg.trainer.max_steps
        where = f"stage {i + 1}/{len(plan)} {stage}"
        done = finished_step(run_dir)
        entry = {"stage": stage, "run_dir": str(run_dir), "max_steps": total}
        if done >= total:
            log.info("pipeline: %s is done (step %d of %d), skipped", where, done, total)
            summary["stages"].append({**entry, "status": "done", "step": done})
            continue
        log.info("pipeline: %s %s in %s%s", where, f"resumes at step {done}" if done else "starts", run_dir,
                 f", from {cfg.trainer.init_from}" if i and cfg.trainer.init_from else "")
        trainer = Trainer(cfg, stage_dict)
        result = trainer.fit()
        del trainer
        gc.collect()
        _empty_device_cache()
        step = int(result["step"])
        summary["history"] = result.get("history") or []
        status = "ran" if step >= total else "stopped"
        summary["stages"].append({**entry, "status": status, "step": step, "sample": result.get("sample")})
        if status == "stopped":
            log.warning("pipeline: %s stopped at step %d of %d; run the same command again to continue", where,
                        step, total)
            break
    return summary


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
