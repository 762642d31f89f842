"""Run logging: one log file per rank, a progress bar on rank 0, Weights & Biases on rank 0.

W&B runs offline when no ``WANDB_API_KEY`` is set (``logger.mode=auto``); ``logger=none`` disables it.
A metric may be a ``LoggedVideo`` (an mp4 file and its caption): W&B gets the video, ``metrics.jsonl`` its path.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lcv_train")


def setup_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_lcv", False):
            root.removeHandler(h)
    fh = logging.FileHandler(logs / f"rank{rank}.log")
    fh.setFormatter(fmt)
    fh._lcv = True
    root.addHandler(fh)
    console = [h for h in root.handlers if _is_console(h)]  # Hydra's (INFO, to stdout) under lcv-train
    for h in console:  # each skipped sample goes to the log file; the loader warns once per reason
        if _not_per_sample not in h.filters:
            h.addFilter(_not_per_sample)
    if rank != 0:
        for h in console:  # other ranks' lines are in their log files; the console gets their warnings only
            h.setLevel(max(h.level, logging.WARNING))
    elif not console:  # one console handler, so that a warning is printed once
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(logging.WARNING)
        sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        sh._lcv = True
        root.addHandler(sh)


def _not_per_sample(record: logging.LogRecord) -> bool:
    return not record.name.startswith("data_loaders.skipped")


def _is_console(h: logging.Handler) -> bool:
    return type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)


class _AboveTheBar(logging.Handler):
    """A console handler's lines written above the progress bar (``tqdm.write``) instead of onto its line."""

    def __init__(self, inner: logging.StreamHandler):
        super().__init__(inner.level)
        self.inner = inner
        self.setFormatter(inner.formatter)
        self.filters = list(inner.filters)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.inner.stream)
        except Exception:
            self.handleError(record)


@dataclass(frozen=True)
class LoggedVideo:
    """A video among a step's metrics (evaluation samples, GRPO rollouts): the one way a video reaches W&B."""

    path: Path  # an mp4 file, written before it is logged
    caption: str

    def to_json(self, run_dir: Path) -> dict:
        path = Path(self.path)
        return {"video": str(path.relative_to(run_dir) if path.is_relative_to(run_dir) else path),
                "caption": self.caption}

    def to_wandb(self):
        import wandb

        return wandb.Video(str(self.path), caption=self.caption, format="mp4")


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, rank: int, total_steps: int, start_step: int, config_dict: dict):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        keep_rows_up_to(run_dir / "metrics.jsonl", start_step)  # a resumed run re-runs the steps after it
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.kind == "wandb":
            mode = cfg.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            if mode != "disabled":
                import wandb

                self.wandb_mode = mode
                # quiet: no history / summary tables at the end; close() prints one line instead
                self.wandb = wandb.init(project=cfg.project, name=run_dir.name, dir=str(run_dir), mode=mode,
                                        config=config_dict, resume="allow", id=_wandb_id(run_dir),
                                        settings=wandb.Settings(quiet=True))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=os.environ.get("LCV_NO_PROGRESS") == "1")
        self._console: list[tuple[logging.StreamHandler, logging.Handler]] = []
        if not self.bar.disable:  # log lines go above the bar, never onto its line
            root = logging.getLogger()
            for h in [h for h in root.handlers if _is_console(h)]:
                above = _AboveTheBar(h)
                root.removeHandler(h)
                root.addHandler(above)
                self._console.append((h, above))

    def log(self, step: int, metrics: dict[str, float], advance: int = 1) -> None:
        if self.rank != 0:
            return
        row = {k: v.to_json(self.run_dir) if isinstance(v, LoggedVideo) else v for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        if self.bar is not None:  # the postfix first: the refresh in update() shows this step's loss
            self.bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                                 step_s=f"{metrics.get('perf/step_time_s', 0):.2f}",
                                 tok_s=f"{metrics.get('perf/tokens_per_s', 0):.0f}", refresh=False)
            self.bar.update(advance)
        if self.wandb is not None:
            self.wandb.log({k: v.to_wandb() if isinstance(v, LoggedVideo) else v for k, v in metrics.items()},
                           step=step)

    def write(self, msg: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if self.rank == 0:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
            root = logging.getLogger()
            for h, above in self._console:
                root.removeHandler(above)
                root.addHandler(h)
            self._console = []
        if self.wandb is not None:
            if self.wandb_mode == "offline":
                where = os.path.relpath(self.wandb.settings.sync_dir)
                line = f"W&B: offline run in {where} (upload it with `wandb sync {where}`)"
            else:
                line = f"W&B: {self.wandb.url}"
            self.wandb.finish()
            print(line, file=sys.stderr)


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of ``path`` (metrics.jsonl) after ``step``, atomically (a new file renamed over it):
    after a resume from step N, the steps after N are trained again and must not appear twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a row torn by a kill mid-write
        if row_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    f = run_dir / "wandb_id"
    if not f.exists():
        f.write_text(f"{run_dir.name}-{int(time.time())}")
    return f.read_text().strip()
