"""WebDataset tar shards: writing them with an index, resolving config entries, reading units.

Shard directory layout (what ``lcv-data pack/synth/encode`` write)::

    shards/index.json            {"format": "lcv-shards", "version": 1, "kind": "pixel"|"latent",
                                  "complete": true, "total": N,
                                  "shards": [{"path": "shard-000000.tar", "count": n, "bytes": b,
                                              "offsets": [byte offset of each sample's first member]}]}
    shards/shard-000000.tar      key.mp4 | key.jpg (pixel) or key.latents.npy + key.text.npy (latent),
                                 and key.json (caption + metadata)

The index gives sample counts (so a shard can be split into several reading units and every sample is
read exactly once per epoch) and byte offsets (so a unit starting mid-shard seeks instead of reading
the prefix; for pipes and URLs the prefix bytes are read and dropped, never parsed or decoded).
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from data_loaders.config import DataConfigError, DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = "lcv-shards"
INDEX_VERSION = 1
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def parse_size(text: str | int) -> int:
    """``"1GB"`` -> 1_000_000_000; ``"512MiB"``; plain integers are bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(float(t))


# --------------------------------------------------------------------------------------------- writing


class ShardSetWriter:
    """Write samples into ``out_dir/shard-NNNNNN.tar`` files of about ``shard_size`` bytes, then the index.

    Samples are dicts ``{"__key__": str, ext: bytes | str | dict}``; dicts are written as JSON.
    """

    def __init__(self, out_dir: str, kind: str, shard_size: int | str = "1GB", max_count: int | None = None, extra: dict | None = None):
        self.out_dir = out_dir
        self.kind = kind
        self.shard_size = parse_size(shard_size)
        self.max_count = max_count
        self.extra = dict(extra or {})
        os.makedirs(out_dir, exist_ok=True)
        self.shards: list[dict] = []
        self._writer: Optional[wds.TarWriter] = None
        self._path = ""
        self._count = 0
        self._bytes = 0
        self.total = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._path = os.path.join(self.out_dir, name)
        self._writer = wds.TarWriter(self._path, encoder=False, mtime=0)
        self._count = 0
        self._bytes = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self.shards.append(
            {
                "path": os.path.basename(self._path),
                "count": self._count,
                "bytes": os.path.getsize(self._path),
                "offsets": sample_offsets(self._path),
            }
        )

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:
            self._open()
        enc: dict[str, Any] = {"__key__": sample["__key__"]}
        size = 0
        for k, v in sample.items():
            if k.startswith("__"):
                continue
            if isinstance(v, (dict, list)):
                v = json.dumps(v, sort_keys=True).encode("utf-8")
            elif isinstance(v, str):
                v = v.encode("utf-8")
            enc[k] = v
            size += len(v) + 512
        self._writer.write(enc)
        self._count += 1
        self._bytes += size
        self.total += 1
        if self._bytes >= self.shard_size or (self.max_count and self._count >= self.max_count):
            self._close()

    def finish(self) -> str:
        """Close the last shard and write ``index.json`` (last, atomically). Returns the index path."""
        self._close()
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "kind": self.kind,
            "complete": True,
            "total": self.total,
            "shards": self.shards,
            **self.extra,
        }
        path = os.path.join(self.out_dir, INDEX_NAME)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, path)
        return path


def sample_offsets(tar_path: str) -> list[int]:
    """Byte offset of the first tar member of every sample (in order), read from the headers only."""
    offsets: list[int] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            key, _ = base_plus_ext(m.name)
            if key is not None and key != last:
                offsets.append(m.offset)
                last = key
    return offsets


# --------------------------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class Unit:
    """A contiguous run of samples of one shard: the smallest piece one reader reads."""

    url: str
    start: int  # first sample (index within the shard)
    count: Optional[int]  # samples in the unit; None when the shard has no index (read to the end)
    offset: int  # byte offset of the first sample (0 when unknown)


@dataclass
class ShardInfo:
    url: str
    count: Optional[int]
    offsets: Optional[list[int]]


def _is_url(s: str) -> bool:
    return bool(urlparse(s).scheme) and not os.path.exists(s) and len(urlparse(s).scheme) > 1


def _shard_in_folder(base: str, rel: Any, where: str) -> str:
    """The location of shard ``rel`` listed by the index of folder ``base``: it must stay inside that folder.

    An index comes with downloaded data, so what it lists is a plain relative path: never ``pipe:`` (which
    would run a command), a URL, an absolute path, ``..``, or (for a local folder) a symlink out of it.
    ``pipe:`` and URLs remain available where the user types them, in ``data.shards``.
    """
    p = rel if isinstance(rel, str) else ""
    norm = posixpath.normpath(p.replace("\\", "/")) if p else ""
    if (not p or "\0" in p or urlparse(p).scheme or ":" in p.split("/")[0] or posixpath.isabs(norm) or os.path.isabs(p)
            or norm == ".." or norm.startswith("../")):
        raise DataError(f"{where}: shard path {rel!r} leaves the data folder; an index may only list relative "
                        f"paths inside its folder (pipe: commands and URLs belong in data.shards itself)")
    if _is_url(base):
        return posixpath.join(base, norm)
    path = os.path.join(base, norm)
    root = os.path.realpath(base)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise DataError(f"{where}: shard path {rel!r} is a link that leaves the data folder {base}; copy the "
                        f"shard into the folder")
    return path


def read_index(location: str) -> Optional[dict]:
    """Read ``index.json`` from a directory, or an index file path/URL. None if there is none."""
    if os.path.isdir(location):
        location = os.path.join(location, INDEX_NAME)
        if not os.path.exists(location):
            return None
    try:
        with wds.gopen(location, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read shard index {location}: {e}") from e
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{location}: not an lcv-shards index (format={index.get('format')!r})")
    return index


def index_is_complete(out_dir: str) -> bool:
    path = os.path.join(out_dir, INDEX_NAME)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def resolve_shards(entries: list[str], key: str) -> list[ShardInfo]:
    """Turn config entries (index dirs, index URLs, shard URLs/brace patterns) into shards."""
    out: list[ShardInfo] = []
    for i, entry in enumerate(entries):
        ekey = f"{key}[{i}]"
        entry = os.path.expanduser(str(entry))
        if os.path.isdir(entry) or entry.endswith(".json"):
            if os.path.isdir(entry) and not os.path.exists(os.path.join(entry, INDEX_NAME)):
                tars = sorted(f for f in os.listdir(entry) if f.endswith(".tar"))
                if not tars:
                    raise DataConfigError(f"{ekey}: directory {entry} has neither {INDEX_NAME} nor .tar files")
                out.extend(ShardInfo(os.path.join(entry, t), None, None) for t in tars)
                continue
            index = read_index(entry)
            if index is None:  # pragma: no cover - handled above
                raise DataConfigError(f"{ekey}: no index at {entry}")
            if not index.get("complete"):
                raise DataError(f"{ekey}: index {entry} is not complete (an interrupted pack/synth/encode?)")
            base = entry if os.path.isdir(entry) else (posixpath.dirname(entry) if _is_url(entry) else os.path.dirname(entry))
            for s in index["shards"]:
                out.append(ShardInfo(_shard_in_folder(base, s.get("path"), f"{ekey}: index {entry}"), int(s["count"]),
                                     s.get("offsets")))
        else:
            urls = list(wds.shardlists.expand_urls(entry)) if "{" in entry else [entry]
            if not _is_url(entry) and not entry.startswith("pipe:"):
                missing = [u for u in urls if not os.path.exists(u)]
                if missing:
                    raise DataConfigError(f"{ekey}: shard {missing[0]} does not exist")
            out.extend(ShardInfo(u, None, None) for u in urls)
    if not out:
        raise DataConfigError(f"{key}: no shards found")
    return out


def make_units(shards: list[ShardInfo], readers: int, units_per_reader: int, key: str) -> list[Unit]:
    """Cut shards into reading units so that every reader gets about ``units_per_reader`` of them.

    Shards with a known count are split into contiguous runs of samples (never empty); shards without
    an index are one unit each. Raises when there are fewer units than readers (a reader would idle
    forever and the mixture ratio could not hold on it).
    """
    counted = [s for s in shards if s.count is not None]
    total = sum(s.count for s in counted)  # type: ignore[misc]
    target_units = max(len(shards), readers * units_per_reader)
    units: list[Unit] = []
    for s in shards:
        if s.count is None:
            units.append(Unit(s.url, 0, None, 0))
            continue
        if s.count == 0:
            continue
        parts = max(1, min(s.count, round(s.count * target_units / max(total, 1))))
        base, extra = divmod(s.count, parts)
        start = 0
        for p in range(parts):
            n = base + (1 if p < extra else 0)
            off = s.offsets[start] if s.offsets and start < len(s.offsets) else 0
            units.append(Unit(s.url, start, n, off if start > 0 else 0))
            start += n
    if len(units) < readers:
        raise DataConfigError(
            f"{key}: {len(units)} reading units ({total} samples in {len(shards)} shards) for {readers} readers "
            f"(world_size x max(1, num_workers)); every reader needs data: use fewer workers, more shards, "
            f"or shards with an index.json"
        )
    return units


# --------------------------------------------------------------------------------------------- reading


class TruncatedShard(Exception):
    def __init__(self, url: str, missing: int, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url = url
        self.missing = missing
        self.detail = detail


def _skip_bytes(stream, n: int) -> None:
    if n <= 0:
        return
    try:
        if stream.seekable():
            stream.seek(n)
            return
    except (AttributeError, OSError):
        pass
    left = n
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)


def iter_unit(unit: Unit) -> Iterator[dict[str, Any]]:
    """Yield the raw samples (``{"__key__", "__url__", ext: bytes}``) of one unit, in shard order.

    A shard that ends early or is corrupt raises :class:`TruncatedShard` after the good samples,
    carrying how many samples the index promised but the shard did not deliver.
    """
    if unit.count is not None and unit.count <= 0:
        return
    got = 0
    stream = None
    close_error: Optional[BaseException] = None
    complete = False
    try:
        stream = wds.gopen(unit.url, "rb")
        skip = unit.start
        if unit.offset > 0:
            _skip_bytes(stream, unit.offset)
            skip = 0

        def files():
            for f in tar_file_iterator(stream):
                f["__url__"] = unit.url
                yield f

        skipped = 0
        for sample in group_by_keys(files()):
            if skipped < skip:
                skipped += 1
                continue
            yield sample
            got += 1
            if unit.count is not None and got >= unit.count:
                complete = True
                return
        complete = True
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        missing = (unit.count - got) if unit.count is not None else 1
        raise TruncatedShard(unit.url, max(missing, 1), f"{type(e).__name__}: {e}") from e
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # noqa: BLE001 - e.g. a pipe command that exited non-zero
                close_error = e
    if close_error is not None and complete and (unit.count is None or got < unit.count):
        raise TruncatedShard(unit.url, 1 if unit.count is None else unit.count - got, f"closing failed: {close_error}")
    if unit.count is not None and got < unit.count:
        raise TruncatedShard(unit.url, unit.count - got, f"ended after {got} of {unit.count} samples")


def media_of(sample: dict[str, Any]) -> tuple[str, str]:
    """("video"|"image"|"latent"|"", ext) for a raw sample."""
    if "latents.npy" in sample or "latents.pth" in sample:
        return "latent", "latents.npy" if "latents.npy" in sample else "latents.pth"
    for e in VIDEO_EXTS:
        if e in sample:
            return "video", e
    for e in IMAGE_EXTS:
        if e in sample:
            return "image", e
    return "", ""
