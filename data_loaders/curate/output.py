"""What a curation run leaves: ``metadata.parquet``, per-cluster shards and the mixture config.

Shards: ``shards/cluster-NNN/`` per content cluster, written by the loader's own ``ShardSetWriter``;
a sample is ``<clip_id>.mp4`` + ``<clip_id>.json`` holding every column of the clip's row (NaN
left out, so a loader filter on a signal that was not computed rejects the clip) plus the keys the
loader reads (``duration``, ``captions``). ``conf/data/curated.yaml`` is a Hydra ``data`` option with
one subset per cluster at its sampling ratio; train on it with
``lcv-train hydra.searchpath=[file://OUT/conf] data=curated``. Everything is written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from typing import Any

from data_loaders.shards import ShardSetWriter


def _clean(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_metadata(df, path: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_shards(df, out: str, shard_size: str) -> dict[int, str]:
    """One shard set per cluster under ``out/shards``; returns {cluster: directory}."""
    final = os.path.join(out, "shards")
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    dirs: dict[int, str] = {}
    for c in sorted(int(v) for v in df["cluster"].unique()):
        d = os.path.join(tmp, f"cluster-{c:03d}")
        w = ShardSetWriter(d, "pixel", shard_size, extra={"curated": {"cluster": c}})
        for row in df[df["cluster"] == c].to_dict("records"):
            meta = {k: _clean(v) for k, v in row.items() if k != "clip_path"}
            meta = {k: v for k, v in meta.items() if v is not None}
            meta.update(key=row["clip_id"], duration=row["duration_s"], media="video", subset=f"cluster_{c:03d}")
            with open(os.path.join(out, row["clip_path"]), "rb") as f:
                w.write({"__key__": row["clip_id"], "mp4": f.read(), "json": meta})
        w.finish()
        dirs[c] = os.path.join(final, f"cluster-{c:03d}")
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return dirs


def write_mixture(out: str, dirs: dict[int, str], ratios: dict[int, float]) -> str:
    """``out/conf/data/curated.yaml``: the data group option with one subset per cluster."""
    lines = [
        "# @package _global_",
        "# Written by `lcv-data curate`: one subset per content cluster, ratio = the cluster's sampling weight.",
        "# lcv-train hydra.searchpath=[file://" + os.path.abspath(os.path.join(out, "conf")) + "] data=curated",
        "defaults:",
        "  - shards",
        "  - _self_",
        "data:",
        "  shards: []",
        "  subsets:",
    ]
    for c, d in sorted(dirs.items()):
        lines.append(f"    cluster_{c:03d}: {{shards: [{os.path.abspath(d)}], ratio: {ratios[c]:.6f}}}")
    path = os.path.join(out, "conf", "data", "curated.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
