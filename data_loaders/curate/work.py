"""The per-file job: analyse, cut into clips, crop, score, caption, write the file's partial table.

A finished file leaves ``work/files/<md5>.parquet`` (written to a temporary name and renamed, last,
after its clips in ``work/clips/<md5>/``): its existence is the done marker a rerun trusts. The job
is a plain function of (input root, probe record, config) so both engines can ship it to workers.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any, Optional

import numpy as np

from data_loaders.curate.analyse import Analysis, Sample, analyse
from data_loaders.curate.config import SCORER_COLUMNS, CurateConfig
from data_loaders.curate.crop import detect_crop
from data_loaders.curate.cut import reencode, stream_copy
from data_loaders.curate.models import load_captioner, load_scorer, run_scorer
from data_loaders.curate.probe import read_sidecar
from data_loaders.curate.quality import blur_score, camera_motion, colour_attributes, flow_stats, to_gray
from data_loaders.curate.scenes import clips_from_cuts

log = logging.getLogger("data_loaders.curate")

SIDECAR_ATTRIBUTES = ("shot_size", "lens", "style")


def atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def done_path(cfg: CurateConfig, md5: str) -> str:
    return os.path.join(cfg.work_dir, "files", f"{md5}.parquet")


def _clip_samples(a: Analysis, s: int, e: int) -> list[Sample]:
    inside = [x for x in a.samples if s <= x.index < e]
    if inside or not a.samples:
        return inside
    return [min(a.samples, key=lambda x: abs(x.index - s))]


def _sidecar_caption(side: dict, start: float, end: float) -> str:
    best, overlap = "", 0.0
    for c in side.get("captions") or []:
        o = min(end, float(c["end_s"])) - max(start, float(c["start_s"]))
        if o > overlap and str(c.get("caption", "")).strip():
            best, overlap = str(c["caption"]).strip(), o
    return best or str(side.get("caption") or "").strip()


def _quality(frames: list[np.ndarray], dt: float) -> dict[str, Any]:
    grays = [to_gray(f) for f in frames]
    stats = [flow_stats(p, q, dt) for p, q in zip(grays[:-1], grays[1:])]
    return {
        "blur": float(np.mean([blur_score(g) for g in grays])),
        "motion": float(np.mean([s[0] for s in stats])) if stats else float("nan"),
        "camera_motion": camera_motion(stats),
        **colour_attributes(frames),
    }


def process_file_safe(root: str, rec: dict[str, Any], cfg: CurateConfig) -> dict[str, Any]:
    """:func:`process_file`, but a file that fails (corrupt past its header, ...) returns ``{"source", "error"}``
    and leaves no done marker, so it is counted and logged now and retried by the next run."""
    try:
        return process_file(root, rec, cfg)
    except Exception as e:  # noqa: BLE001
        return {"source": rec["source"], "error": f"{type(e).__name__}: {e}"}


def process_file(root: str, rec: dict[str, Any], cfg: CurateConfig) -> dict[str, Any]:
    """Curate one (probed, deduplicated) file; return ``{"source", "clips", "dropped", "skipped", "path"}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(root, rec["source"])
    md5 = rec["md5"]
    fps = float(rec["fps"])
    dropped: dict[str, int] = {}
    skipped: set[str] = set()

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    side = read_sidecar(path)
    a = analyse(path, fps, cfg.step("scenes"), cfg.sample_fps, cfg.analysis_size, cfg.scene_detector,
                cfg.scene_threshold, cfg.min_scene_frames, cfg.transnet_weights)
    ranges, too_short = clips_from_cuts(a.cuts, a.n, fps, cfg.min_clip_s, cfg.max_clip_s)
    dropped.update({"too_short": too_short} if too_short else {})
    scorers: dict[str, Any] = {}
    if cfg.step("scorers"):
        for name in SCORER_COLUMNS:
            model, why = load_scorer(name, cfg.scorers.get(name))
            if model is None:
                skipped.add(why)  # type: ignore[arg-type]
            else:
                scorers[name] = model
    captioner: Optional[Any] = None
    if cfg.step("captions"):
        captioner, why = load_captioner(cfg.captioner)
        if why:
            skipped.add(why)
    clip_dir = os.path.join(cfg.work_dir, "clips", md5)
    os.makedirs(clip_dir, exist_ok=True)
    for name in os.listdir(clip_dir):  # left by an interrupted attempt at this file
        if ".tmp-" in name:
            os.remove(os.path.join(clip_dir, name))
    rows = []
    for k, (s, e) in enumerate(ranges):
        samples = _clip_samples(a, s, e)
        full = (0, 0, a.width, a.height)
        crop = detect_crop([x.rows for x in samples], [x.cols for x in samples], cfg.crop_limit) if cfg.step("crop") else full
        if crop is None:
            drop("black")
            continue
        x, y, w, h = crop
        ax0, ay0 = int(x * a.scale), int(y * a.scale)
        ax1, ay1 = max(ax0 + 2, int(round((x + w) * a.scale))), max(ay0 + 2, int(round((y + h) * a.scale)))
        frames = [np.ascontiguousarray(smp.rgb[ay0:ay1, ax0:ax1]) for smp in samples]
        start_s, end_s = s / fps, e / fps  # frame index / fps: constant frame rate assumed
        caption, caption_source = _sidecar_caption(side, start_s, end_s), "sidecar"
        model_attrs: dict[str, Any] = {}
        if captioner is not None:
            try:
                got = captioner(frames)
                if isinstance(got, dict):  # a captioner may also name shot size, lens, style
                    model_attrs = {key: str(got[key]) for key in SIDECAR_ATTRIBUTES if got.get(key)}
                    got = got.get("caption", "")
                caption, caption_source = str(got).strip(), "captioner"
            except Exception as ex:  # noqa: BLE001
                skipped.add(f"captioner failed: {type(ex).__name__}: {ex}")
        if not caption:
            drop("no_caption")
            continue
        row: dict[str, Any] = {
            "clip_id": f"{md5[:12]}-{k:04d}", "source": rec["source"], "source_id": rec.get("source_id", ""),
            "start_s": start_s, "end_s": end_s, "duration_s": (e - s) / fps, "num_frames": e - s,
            "width": w, "height": h, "fps": fps, "bitrate": int(rec["bitrate"]), "codec": rec["codec"],
            "src_width": a.width, "src_height": a.height, "crop_x": x, "crop_y": y, "crop_w": w, "crop_h": h,
            "md5": md5, "caption": caption, "caption_source": caption_source, "scene_detector": a.detector or "none",
        }
        for attr in SIDECAR_ATTRIBUTES:
            row[attr] = model_attrs.get(attr) or str(side.get(attr) or "unknown")
        if cfg.step("quality"):
            row.update(_quality(frames, dt=max(1, int(round(fps / cfg.sample_fps))) / fps))
        for name, model in scorers.items():
            row[name] = run_scorer(model, frames)
        end_pts = a.pts[e] if e < a.n else None
        if crop == full and a.keyframe[s] and (e == a.n or a.keyframe[e]):
            data, row["cut"] = stream_copy(path, a.pts[s], end_pts), "copy"
        else:
            data, n = reencode(path, a.pts[s], end_pts, crop, fps, cfg.crf, cfg.preset)
            row["cut"] = "reencode"
            if n != e - s:
                log.warning("curate: %s clip %d: decoded %d frames, expected %d", rec["source"], k, n, e - s)
                row["num_frames"], row["duration_s"] = n, n / fps
        row["clip_bitrate"] = int(len(data) * 8 / max(row["duration_s"], 1e-6))
        clip_path = os.path.join(clip_dir, row["clip_id"] + ".mp4")
        atomic_write(clip_path, data)
        row["clip_path"] = os.path.relpath(clip_path, cfg.out)
        rows.append(row)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"clip_id": pa.array([], pa.string())})
    meta = {"dropped": dropped, "skipped": sorted(skipped), "frames": a.n, "cuts": a.cuts}
    table = table.replace_schema_metadata({"curate": json.dumps(meta)})
    out = done_path(cfg, md5)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return {"source": rec["source"], "clips": len(rows), "path": out, **meta}
