"""Dedup by source id and by MD5 of the file: the first file (in path order) of each group is kept."""

from __future__ import annotations

from typing import Any


def dedup(records: list[dict[str, Any]], by_source_id: bool = True) -> tuple[list[dict], dict[str, list[str]]]:
    """``records`` sorted by path -> (kept, {reason: [dropped sources]}) with reasons dup_md5 / dup_source_id."""
    kept: list[dict] = []
    dropped: dict[str, list[str]] = {"dup_md5": [], "dup_source_id": []}
    md5s: set[str] = set()
    ids: set[str] = set()
    for r in records:
        if r["md5"] in md5s:
            dropped["dup_md5"].append(r["source"])
            continue
        sid = r.get("source_id") or ""
        if by_source_id and sid and sid in ids:
            dropped["dup_source_id"].append(r["source"])
            continue
        md5s.add(r["md5"])
        if sid:
            ids.add(sid)
        kept.append(r)
    return kept, dropped
