"""``lcv-data stats``: counts by bucket, subset and media, skip reasons, metadata ranges.

Every sample goes through the loader's own planning step (parse, bucket, count bad) so the numbers
are what training will see; nothing is decoded.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

from data_loaders.buckets import bucket_name
from data_loaders.config import DataConfig, validate
from data_loaders.loader import make_plan
from data_loaders.pipeline import Reader

_SKIP_KEYS = {"key", "caption", "source"}


def collect_stats(shards: list[str], buckets: list[list[int]], fps: float, temporal_stride: int = 1,
                  base: Optional[DataConfig] = None) -> dict[str, Any]:
    cfg = replace(base or DataConfig(), shards=list(shards), subsets={}, buckets=[list(b) for b in buckets], fps=float(fps),
                  temporal_stride=temporal_stride, num_workers=0, shuffle=False, epochs=1, units_per_reader=1,
                  bad_min_samples=1, max_bad_fraction=1.0, max_empty_epochs=10**9)
    validate(cfg)
    plan = make_plan(cfg, 0, 1, 0)
    reader = Reader(plan, 0)
    by_bucket: dict[str, int] = {}
    by_subset: dict[str, int] = {}
    by_media: dict[str, int] = {}
    ranges: dict[str, list[float]] = {}  # key -> [count, min, sum, max]
    total = 0
    for s in range(len(plan.subsets)):
        for smp in reader.iter_subset(s):
            total += 1
            b = plan.buckets[smp.bucket]
            by_bucket[bucket_name(b)] = by_bucket.get(bucket_name(b), 0) + 1
            sub = str(smp.meta.get("subset", "-"))
            by_subset[sub] = by_subset.get(sub, 0) + 1
            by_media[smp.kind] = by_media.get(smp.kind, 0) + 1
            for k, v in smp.meta.items():
                if k in _SKIP_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                r = ranges.setdefault(k, [0, math.inf, 0.0, -math.inf])
                r[0] += 1
                r[1] = min(r[1], v)
                r[2] += v
                r[3] = max(r[3], v)
    c = reader.state.counters
    return {
        "samples": total,
        "read": c.get("read", 0),
        "units": sum(len(sp.units) for sp in plan.subsets),
        "by_bucket": dict(sorted(by_bucket.items())),
        "by_subset": dict(sorted(by_subset.items())),
        "by_media": dict(sorted(by_media.items())),
        "skipped": {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("skipped/")},
        "metadata": {k: {"count": int(r[0]), "min": r[1], "mean": r[2] / r[0], "max": r[3]} for k, r in sorted(ranges.items())},
    }


def format_stats(st: dict[str, Any]) -> str:
    lines = [f"samples: {st['samples']} usable of {st['read']} read ({st['units']} shard units)"]
    for title, key in (("by bucket (frames x height x width)", "by_bucket"), ("by subset", "by_subset"),
                       ("by media", "by_media"), ("skipped", "skipped")):
        lines.append(f"{title}:")
        if not st[key]:
            lines.append("  (none)")
        for k, v in st[key].items():
            lines.append(f"  {k:<28} {v:>10}")
    lines.append("metadata ranges:")
    lines.append(f"  {'key':<20} {'count':>8} {'min':>12} {'mean':>12} {'max':>12}")
    for k, r in st["metadata"].items():
        lines.append(f"  {k:<20} {r['count']:>8} {r['min']:>12.4g} {r['mean']:>12.4g} {r['max']:>12.4g}")
    return "\n".join(lines)
