"""How good is the embedded default's model? Its compliance scores and validation curve.

    python bench/demo_quality.py                        # run `lcv-train` (the default), report its evaluations
    python bench/demo_quality.py -- trainer.max_steps=2000 eval.every=250     # any overrides: a longer run
    python bench/demo_quality.py --run outputs/RUN      # report a finished run's evaluations (metrics.jsonl)
    python bench/demo_quality.py --checkpoints outputs/RUN [--steps 500,1000]   # evaluate its saved checkpoints

Prints one row per evaluation (step, validation loss per sigma, compliance and its parts, sharpness) and
appends the table, the command, the CPU time and the machine to bench/RESULTS.md (``--no-record`` not).
The scores are those of ``lcv_train.rewards.synthetic`` on the sample videos of the held-out prompts (EMA
weights); chance is (1/6 + 1/3 + 1/8) / 3 = 0.208 for compliance.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHANCE = {"compliance": (1 / 6 + 1 / 3 + 1 / 8) / 3, "colour": 1 / 6, "shape": 1 / 3, "motion": 1 / 8}


def _rows_of_run(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if any(k.startswith("eval/") for k in r)]


def _train(overrides: list[str]) -> tuple[Path, float, float, str]:
    root = Path(tempfile.mkdtemp(prefix="demo_quality_"))
    cmd = [sys.executable, "-m", "lcv_train", f"run.root={root}", "run.name=demo", *overrides]
    env = dict(os.environ, LCV_NO_PROGRESS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        sys.exit(f"demo_quality: lcv-train failed ({p.returncode}):\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    last = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith(("lcv-train: steps", "eval at step"))]
    return root / "demo", wall, cpu, "\n".join(last)


def _evaluate_checkpoints(run: Path, steps: list[int] | None) -> list[dict]:
    """Evaluate saved checkpoints of ``run`` (EMA weights) with the run's own config and eval settings."""
    import yaml

    from lcv_train.config import train_config_from_dict
    from lcv_train.training.trainer import Trainer

    base = yaml.safe_load((run / "config.yaml").read_text())
    base["logger"] = {"kind": "none", "project": "bench", "mode": "disabled"}
    base.setdefault("eval", {}).setdefault("scorers", ["synthetic_compliance"])
    found = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if p.is_dir()
                   and not p.name.endswith(".tmp"))
    rows = []
    for step in steps or found:
        c = copy.deepcopy(base)
        c["run"].update(root=str(run / "bench_eval"), name=f"step_{step:07d}")
        c["trainer"]["resume"] = str(run / "checkpoints" / f"step_{step:07d}")
        trainer = Trainer(train_config_from_dict(c), c)
        figures = trainer.evaluator.run(step)
        rows.append({"step": step, **{k: v for k, v in figures.items() if not k.startswith("eval/video/")}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    sigmas = sorted({k.rsplit("_", 1)[1] for r in rows for k in r if k.startswith("eval/val_loss/sigma_")}, key=float)
    head = ["step", "val loss"] + [f"sigma {s}" for s in sigmas] + ["compliance", "colour", "shape", "motion",
                                                                   "sharpness"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---:" for _ in head) + " |"]
    for r in rows:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else "-"
        cells = [str(r["step"]), f("eval/val_loss")] + [f(f"eval/val_loss/sigma_{s}") for s in sigmas]
        cells += [f("eval/compliance"), f("eval/compliance/colour"), f("eval/compliance/shape"),
                  f("eval/compliance/motion"), f("eval/compliance/sharpness", "{:.4f}")]
        lines.append("| " + " | ".join(cells) + " |")
    chance = ", ".join(f"{k} {v:.3f}" for k, v in CHANCE.items())
    return "\n".join(lines) + f"\n\nChance: {chance}.\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="report this finished run's evaluations instead of training")
    ap.add_argument("--checkpoints", type=Path, help="evaluate this run's saved checkpoints")
    ap.add_argument("--steps", help="with --checkpoints: these steps only (comma-separated)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence for RESULTS.md (what the run shows)")
    ap.add_argument("overrides", nargs="*", help="lcv-train overrides (after --)")
    a = ap.parse_args(argv)
    wall = cpu = None
    tail = ""
    if a.checkpoints:
        rows = _evaluate_checkpoints(a.checkpoints, [int(s) for s in a.steps.split(",")] if a.steps else None)
        what = f"checkpoints of {a.checkpoints} (its config; EMA weights)"
    elif a.run:
        rows, what = _rows_of_run(a.run), f"run {a.run}"
    else:
        run, wall, cpu, tail = _train(a.overrides)
        rows, what = _rows_of_run(run), "`" + " ".join(["lcv-train", *a.overrides]) + "`"
    table = _table(rows)
    print(table)
    if tail:
        print(tail)
    if wall is not None:
        print(f"wall {wall:.0f} s, CPU (user + system, all processes) {cpu:.0f} s")
    if not a.no_record:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the end"
        timing = f" Wall {wall:.0f} s, CPU {cpu:.0f} s (user + system, all processes)." if wall is not None else ""
        section = (f"\n## Demo quality (`python bench/demo_quality.py`): {what}\n\n{machine}.{timing} "
                   f"{a.note}\n\n{table}")
        if tail:
            section += "\n```\n" + tail + "\n```\n"
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
