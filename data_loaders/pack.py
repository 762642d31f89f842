"""``lcv-data pack``: a CSV table of video/image files with captions -> WebDataset shards + index.

Columns: ``path`` (or ``video``/``image``/``file``; relative paths are relative to the CSV), ``caption``
(or ``text``/``prompt``), optional ``key``; every other column is kept as metadata (numbers parsed,
empty cells dropped). Geometry (width, height, fps, num_frames, duration) is probed with PyAV, so
filters and buckets never need to decode. Rows whose file is missing, unsupported or undecodable,
or whose caption is empty, are skipped and counted.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from typing import Any, Optional

from data_loaders.decode import DecodeError, probe_image, probe_video
from data_loaders.shards import IMAGE_EXTS, INDEX_NAME, VIDEO_EXTS, ShardSetWriter

log = logging.getLogger("data_loaders")

PATH_COLUMNS = ("path", "video", "image", "file", "filepath", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def _value(v: str) -> Any:
    v = v.strip()
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _pick(columns: list[str], wanted: Optional[str], choices: tuple[str, ...], what: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"--{what}-column {wanted!r} is not a column of the CSV ({', '.join(columns)})")
        return wanted
    for c in choices:
        if c in columns:
            return c
    raise ValueError(f"the CSV needs a {what} column (one of {', '.join(choices)}); columns: {', '.join(columns)}")


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (they separate key and extension) and no slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def pack(
    input_csv: str,
    out_dir: str,
    shard_size: str | int = "1GB",
    path_column: Optional[str] = None,
    caption_column: Optional[str] = None,
) -> dict[str, Any]:
    """Write the shards; return a summary ``{"written", "shards", "skipped": {reason: n}, "index"}``."""
    base = os.path.dirname(os.path.abspath(input_csv))
    if os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        os.remove(os.path.join(out_dir, INDEX_NAME))  # an index means "complete"; rewrite it at the end
    skipped: dict[str, int] = {}
    seen: set[str] = set()

    def skip(reason: str, row: int, detail: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        log.warning("pack: row %d skipped (%s): %s", row, reason, detail)

    writer = ShardSetWriter(out_dir, "pixel", shard_size, extra={"source": os.path.abspath(input_csv)})
    with open(input_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        pcol = _pick(columns, path_column, PATH_COLUMNS, "path")
        ccol = _pick(columns, caption_column, CAPTION_COLUMNS, "caption")
        for i, row in enumerate(reader):
            rel = (row.get(pcol) or "").strip()
            path = rel if os.path.isabs(rel) else os.path.join(base, rel)
            caption = (row.get(ccol) or "").strip()
            if not rel or not os.path.isfile(path):
                skip("missing_file", i, path)
                continue
            if not caption:
                skip("missing_caption", i, path)
                continue
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in VIDEO_EXTS + IMAGE_EXTS:
                skip("unsupported", i, path)
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                geom = probe_video(data) if ext in VIDEO_EXTS else probe_image(data)
            except DecodeError as e:
                skip("undecodable", i, f"{path}: {e}")
                continue
            key = safe_key(str(row.get("key") or "").strip() or f"{i:09d}")
            if key in seen:
                skip("duplicate_key", i, key)
                continue
            seen.add(key)
            meta: dict[str, Any] = {}
            for c in columns:
                if c in (pcol, ccol, "key"):
                    continue
                v = _value(row.get(c) or "")
                if v is not None:
                    meta[c] = v
            meta.update(geom)
            meta.update(key=key, caption=caption, source=rel, media="video" if ext in VIDEO_EXTS else "image")
            writer.write({"__key__": key, ext: data, "json": meta})
    writer.extra["pack_skipped"] = skipped
    index = writer.finish()
    return {"written": writer.total, "shards": len(writer.shards), "skipped": skipped, "index": index}
