"""Input listing, file identity (MD5, source id) and technical metadata, and sidecar files.

A sidecar is ``<video stem>.json`` next to the video (``source_id``, ``caption``, ``captions``:
``[{start_s, end_s, caption}]`` for parts of the file, and any of ``shot_size``, ``lens``, ``style``)
or ``<video stem>.txt`` (one caption for the whole file).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from data_loaders.shards import VIDEO_EXTS


def list_inputs(root: str) -> list[str]:
    """Video files under ``root`` (recursively), as sorted paths relative to it."""
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            if os.path.splitext(f)[1].lower().lstrip(".") in VIDEO_EXTS:
                out.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(out)


def file_md5(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def read_sidecar(path: str) -> dict[str, Any]:
    stem = os.path.splitext(path)[0]
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{stem}.json: expected a JSON object")
        return data
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            return {"caption": f.read().strip()}
    return {}


def probe_file(root: str, rel: str) -> dict[str, Any]:
    """Identity and technical metadata of one input; ``{"source", "error"}`` when it cannot be read."""
    import av

    path = os.path.join(root, rel)
    rec: dict[str, Any] = {"source": rel, "size": os.path.getsize(path)}
    try:
        rec["md5"] = file_md5(path)
        side = read_sidecar(path)
        rec["source_id"] = str(side.get("source_id") or "")
        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            duration = float(c.duration / av.time_base) if c.duration else float(vs.duration * vs.time_base) if vs.duration else 0.0
            rec.update(
                src_width=int(vs.codec_context.width),
                src_height=int(vs.codec_context.height),
                fps=float(rate) if rate else 0.0,
                src_duration_s=duration,
                bitrate=int(c.bit_rate or (rec["size"] * 8 / duration if duration else 0)),
                codec=str(vs.codec_context.name),
            )
        if rec["fps"] <= 0 or rec["src_width"] <= 0:
            raise ValueError("no frame rate or frame size")
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and counted
        return {"source": rel, "error": f"{type(e).__name__}: {e}"}
    return rec
