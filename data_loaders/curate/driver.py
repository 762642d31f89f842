"""The curation driver: probe -> dedup -> per-file work (parallel, resumable) -> table-wide steps.

Per-file results are cached under ``out/work`` (``probe/`` records keyed by path, size and mtime;
``files/<md5>.parquet`` done markers with ``clips/<md5>/``), so a rerun, after a crash or with new
files added, redoes no finished file. The table-wide steps (caption augmentation, clustering,
weights, shards, mixture, report) are cheap and always rerun from the cached per-file tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from typing import Any

from data_loaders.curate.config import CurateConfig, validate
from data_loaders.curate.dedup import dedup
from data_loaders.curate.engine import close, run
from data_loaders.curate.probe import list_inputs, probe_file
from data_loaders.curate.work import atomic_write, done_path, process_file_safe

log = logging.getLogger("data_loaders.curate")

# Test hook: SIGKILL this process after N per-file jobs have finished (simulates an interrupted run).
KILL_AFTER_ENV = "LCV_CURATE_KILL_AFTER"


def probe_cached(root: str, rel: str, cache_dir: str) -> dict[str, Any]:
    st = os.stat(os.path.join(root, rel))
    stamp = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}"
    path = os.path.join(cache_dir, hashlib.sha1(stamp.encode()).hexdigest() + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    rec = probe_file(root, rel)
    atomic_write(path, json.dumps(rec).encode())
    return rec


def _read_partial(path: str):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    meta = json.loads((t.schema.metadata or {}).get(b"curate", b"{}"))
    return t.to_pandas(), meta


def curate(cfg: CurateConfig) -> dict[str, Any]:
    """Run the pipeline; return the summary (also written to ``out/report.json``)."""
    validate(cfg)
    try:
        return _curate(cfg)
    finally:
        close()


def _curate(cfg: CurateConfig) -> dict[str, Any]:
    import pandas as pd

    root = os.path.abspath(cfg.input)
    cfg.out = os.path.abspath(cfg.out)
    for d in ("probe", "files", "clips"):
        os.makedirs(os.path.join(cfg.work_dir, d), exist_ok=True)
    steps: list[dict[str, Any]] = []

    files = [f for f in list_inputs(root) if not os.path.join(root, f).startswith(cfg.out + os.sep)]  # not our clips
    probe_dir = os.path.join(cfg.work_dir, "probe")
    recs = sorted((r for _, r in run(probe_cached, [(root, f, probe_dir) for f in files], cfg.engine, cfg.workers,
                                     cfg.ray_address)), key=lambda r: r["source"])
    bad = [r for r in recs if "error" in r]
    for r in bad:
        log.warning("curate: %s skipped (unreadable): %s", r["source"], r["error"])
    recs = [r for r in recs if "error" not in r]
    steps.append({"name": "probe", "kept": len(recs), "dropped": {"unreadable": len(bad)}})
    if cfg.step("dedup"):
        recs, dups = dedup(recs)
        for reason, srcs in dups.items():
            for s in srcs:
                log.info("curate: %s dropped (%s)", s, reason)
        steps.append({"name": "dedup", "kept": len(recs), "dropped": {k: len(v) for k, v in dups.items()}})

    todo = [r for r in recs if not os.path.exists(done_path(cfg, r["md5"]))]
    resumed = len(recs) - len(todo)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    finished, failed = 0, []
    for (_, rec, _), res in run(process_file_safe, [(root, r, cfg) for r in todo], cfg.engine, cfg.workers,
                                cfg.ray_address):
        if "error" in res:
            failed.append(rec["source"])
            log.warning("curate: %s failed (retried by the next run): %s", rec["source"], res["error"])
            continue
        finished += 1
        log.info("curate: %s -> %d clips", rec["source"], res["clips"])
        if kill_after and finished >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    recs = [r for r in recs if r["source"] not in set(failed)]
    steps.append({"name": "files", "kept": len(recs), "dropped": {"failed": len(failed)}})

    frames, dropped, skipped, detectors = [], {}, set(), set()
    for r in recs:
        df, meta = _read_partial(done_path(cfg, r["md5"]))
        if len(df):
            frames.append(df)
        for k, v in meta.get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + v
        skipped.update(meta.get("skipped", []))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"clip_id": [], "caption": []})
    df = df.sort_values("clip_id", kind="stable").reset_index(drop=True)
    steps.append({"name": "clips", "kept": len(df), "dropped": dropped})
    if len(df) and "scene_detector" in df:
        detectors = set(df["scene_detector"])

    df, table_skipped, info = _table_steps(df, cfg)
    skipped.update(table_skipped)
    from data_loaders.curate.output import write_metadata, write_mixture, write_shards

    meta_path = os.path.join(cfg.out, "metadata.parquet")
    write_metadata(df, meta_path)
    summary: dict[str, Any] = {
        "steps": steps, "skipped": sorted(skipped), "files_processed": finished, "files_resumed": resumed,
        "clips": int(len(df)), "clusters": int(df["cluster"].nunique()) if len(df) else 0, "metadata": meta_path,
        "scene_detectors": sorted(detectors), "engine": cfg.engine, **info,
    }
    if cfg.step("shards") and len(df):
        from data_loaders.curate.cluster import cluster_ratios

        dirs = write_shards(df, cfg.out, cfg.shard_size)
        summary["shards"] = {f"cluster_{c:03d}": d for c, d in dirs.items()}
        summary["mixture"] = write_mixture(cfg.out, dirs, cluster_ratios(df["cluster"].to_numpy(), cfg.cluster_balance))
    if cfg.report and len(df):
        from data_loaders.curate.report import write_histograms

        summary["histograms"] = write_histograms(df, os.path.join(cfg.out, "report"))
    atomic_write(os.path.join(cfg.out, "report.json"), json.dumps(summary, indent=1).encode())
    return summary


def _table_steps(df, cfg: CurateConfig):
    """Caption augmentation, clusters and sampling weights over the whole table."""
    skipped: set[str] = set()
    info: dict[str, str] = {"embedding": "none"}
    if not len(df):
        df["cluster"], df["cluster_weight"], df["captions"] = [], [], []
        return df, skipped, info
    if cfg.step("augment"):
        from data_loaders.curate.augment import augment_captions
        from data_loaders.curate.models import load_translator

        translate, why = load_translator(cfg.translate)
        if why:
            skipped.add(why)
        df["captions"] = [augment_captions(r, cfg.seed, translate=translate, langs=cfg.translate_langs)
                          for r in df.to_dict("records")]
    else:
        df["captions"] = [[c] for c in df["caption"]]
    if cfg.step("cluster"):
        from data_loaders.curate.cluster import embed, kmeans_labels

        x, method, why = embed(df["caption"].tolist(), cfg.embedder)
        if why:
            skipped.add(why)
        df["cluster"] = kmeans_labels(x, min(cfg.clusters, df["caption"].nunique()), cfg.seed)
        info["embedding"] = method
    else:
        df["cluster"] = 0
    from data_loaders.curate.cluster import cluster_ratios

    ratios = cluster_ratios(df["cluster"].to_numpy(), cfg.cluster_balance)
    counts = df["cluster"].value_counts().to_dict()
    df["cluster_weight"] = [ratios[int(c)] / counts[c] for c in df["cluster"]]
    return df, skipped, info
