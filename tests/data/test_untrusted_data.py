"""Downloaded data under attack: an index that names commands or paths outside its folder, worker-side
errors, and shards without an index that cannot be read at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _datakit import small_config as _cfg, video_sample, write_set
from data_loaders import DataError, build_loader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def good_set(tmp_path):
    return write_set(str(tmp_path / "set"), [video_sample(f"k{i}") for i in range(4)], per_shard=4)


def _point_index_at(folder, path):
    index_file = os.path.join(folder, "index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["shards"][0]["path"] = path
    with open(index_file, "w") as f:
        json.dump(index, f)


def test_index_with_a_pipe_command_runs_nothing(good_set, tmp_path):
    """Bug caught: a shard path `pipe:<cmd>; cat shard.tar` in index.json ran <cmd> in lcv-train and
    lcv-data stats, and training carried on."""
    marker = tmp_path / "pwned"
    _point_index_at(good_set, f"pipe:touch {marker}; cat {good_set}/shard-000000.tar")
    with pytest.raises(DataError, match=r"data.shards\[0\]: index .*: shard path 'pipe:.*' leaves the data folder"):
        list(build_loader(_cfg(good_set), 0, 1, 0))
    p = subprocess.run([sys.executable, "-m", "data_loaders.cli", "stats", good_set], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "leaves the data folder" in p.stderr
    assert not marker.exists(), "the index's pipe: command ran"


@pytest.mark.parametrize("path", ["../outside/shard-000000.tar", "sub/../../x.tar", "/etc/passwd",
                                  "http://example.com/s.tar", "file:///etc/passwd", ""])
def test_index_paths_must_stay_in_the_folder(good_set, path):
    _point_index_at(good_set, path)
    with pytest.raises(DataError, match="leaves the data folder"):
        build_loader(_cfg(good_set), 0, 1, 0)


def test_index_symlink_out_of_the_folder_is_refused(good_set, tmp_path):
    outside = tmp_path / "outside.tar"
    os.rename(os.path.join(good_set, "shard-000000.tar"), outside)
    os.symlink(outside, os.path.join(good_set, "shard-000000.tar"))
    with pytest.raises(DataError, match="link that leaves the data folder"):
        build_loader(_cfg(good_set), 0, 1, 0)


def test_index_relative_paths_inside_the_folder_still_work(good_set):
    os.makedirs(os.path.join(good_set, "sub"))
    os.rename(os.path.join(good_set, "shard-000000.tar"), os.path.join(good_set, "sub", "a.tar"))
    _point_index_at(good_set, "sub/./a.tar")
    keys = [k for b in build_loader(_cfg(good_set), 0, 1, 0) for k in b["keys"]]
    assert sorted(keys) == ["k0", "k1", "k2", "k3"]


def test_worker_data_error_arrives_as_one_line(tmp_path):
    """Bug caught: a DataError raised in a DataLoader worker arrived as "Caught DataError in DataLoader
    worker process 0" plus a traceback; it must be the same one line as with num_workers=0."""
    garbage = []
    for i in range(8):
        s = video_sample(f"bad{i}")
        s["mp4"] = os.urandom(2000)
        garbage.append(s)
    d = write_set(str(tmp_path / "bad"), garbage, per_shard=4)
    messages = {}
    for workers in (0, 1):
        loader = build_loader(_cfg(d, num_workers=workers, max_bad_fraction=0.2, bad_min_samples=2, epochs=None), 0, 1, 0)
        with pytest.raises(DataError) as e:
            next(iter(loader))
        loader.close()
        messages[workers] = str(e.value)
    assert "\n" not in messages[1] and "Caught" not in messages[1], messages[1]
    assert messages[1] == messages[0]  # same reader, same counts, same line


def _unindexed_set(tmp_path, shards=10, per_shard=4, unreadable=3):
    d = write_set(str(tmp_path / "u"), [video_sample(f"k{i:03d}") for i in range(shards * per_shard)], per_shard=per_shard)
    os.remove(os.path.join(d, "index.json"))
    for i in range(unreadable):  # whole shards of garbage: nothing in them can be read, not even a header
        path = os.path.join(d, f"shard-{i * 3 + 1:06d}.tar")
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
    return d


def test_unreadable_shards_without_index_count_what_they_lost(tmp_path):
    """Bug caught: without index.json a whole unreadable shard counted as one bad sample, so
    data.max_bad_fraction=0.2 let a run train to the end on 30% bad data."""
    d = _unindexed_set(tmp_path)
    loader = build_loader(_cfg(d, max_bad_fraction=0.5), 0, 1, 0)
    keys = [k for b in loader for k in b["keys"]]
    m = loader.metrics()
    assert len(keys) == 28
    assert m["data/skipped/truncated_tar"] == 12  # 3 shards x 4 samples, estimated from the 7 read whole
    assert m["data/bad_fraction"] == pytest.approx(12 / 40)
    with pytest.raises(DataError, match="max_bad_fraction=0.2"):
        list(build_loader(_cfg(d, max_bad_fraction=0.2, bad_min_samples=8), 0, 1, 0))
