"""``--report``: counts per step (kept, dropped and why, skipped models) and PNG histograms."""

from __future__ import annotations

import os
from typing import Any

HIST_COLUMNS = ("blur", "motion", "duration_s", "aesthetic", "text_coverage", "watermark")


def format_report(summary: dict[str, Any]) -> str:
    lines = ["step            kept   dropped (why)"]
    for step in summary["steps"]:
        why = ", ".join(f"{k}={v}" for k, v in sorted(step["dropped"].items()) if v) or "-"
        lines.append(f"{step['name']:<14} {step['kept']:>6}   {sum(step['dropped'].values()):>4} ({why})")
    for s in summary["skipped"]:
        lines.append(f"skipped: {s}")
    lines.append(f"files: {summary['files_processed']} processed, {summary['files_resumed']} already done (resumed)")
    lines.append(f"clips: {summary['clips']} in {summary['clusters']} clusters -> {summary['metadata']}")
    return "\n".join(lines)


def write_histograms(df, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for col in HIST_COLUMNS:
        if col not in df or df[col].dropna().empty:
            continue
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.hist(df[col].dropna().to_numpy(), bins=30)
        ax.set_xlabel(col)
        ax.set_ylabel("clips")
        fig.tight_layout()
        p = os.path.join(out_dir, f"{col}.png")
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)
    return paths
