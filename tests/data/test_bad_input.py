"""Bad input is skipped, counted per reason, logged with shard and key; too much of it stops training."""

from __future__ import annotations

import json
import logging
import os

import pytest

from _datakit import small_config as _cfg, truncate, video_sample, write_set
from data_loaders import DataConfig, DataError, build_loader


@pytest.fixture()
def bad_set(tmp_path):
    good = [video_sample(f"g{i:02d}") for i in range(10)]
    garbage = video_sample("garbage")
    garbage["mp4"] = os.urandom(3000)
    nocap = video_sample("nocap", caption=None)
    short = video_sample("short", frames=3)
    lying = video_sample("lying", frames=3)  # metadata claims 12 frames; the file has 3
    lying["json"].update(num_frames=12, duration=1.5)
    nomedia = {"__key__": "nomedia", "json": {"caption": "x", "width": 32, "height": 32}}
    badjson = video_sample("badjson")
    badjson["json"] = b"{not json"
    # shard 0: the bad ones + 2 good; shard 1: 8 good, then truncated in its middle
    samples = good[:2] + [garbage, nocap, short, lying, nomedia, badjson] + good[2:]
    d = write_set(str(tmp_path / "bad"), samples, per_shard=8)
    truncate(os.path.join(d, "shard-000001.tar"), 0.5)
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_counted_per_reason(bad_set, workers, caplog):
    cfg = _cfg(bad_set, num_workers=workers, units_per_reader=1)
    with caplog.at_level(logging.INFO, logger="data_loaders"):
        loader = build_loader(cfg, 0, 1, seed=0)
        keys = [k for b in loader for k in b["keys"]]
    # the console's share: one warning per reason, from the loader, whatever the number of workers
    warned = [r.getMessage().split()[2] for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(warned) == sorted(set(warned)) and {"undecodable", "missing_caption"} <= set(warned), warned
    m = loader.metrics()
    assert m["data/skipped/undecodable"] == 2  # garbage bytes, and a clip shorter than its metadata
    assert m["data/skipped/missing_caption"] == 1
    assert m["data/skipped/too_short"] == 1
    assert m["data/skipped/missing_media"] == 1
    assert m["data/skipped/bad_metadata"] == 1
    with open(os.path.join(bad_set, "index.json")) as f:
        shard1_count = json.load(f)["shards"][1]["count"]
    lost = m["data/skipped/truncated_tar"]
    assert 1 <= lost <= shard1_count
    assert len(keys) == 10 - lost and all(k.startswith("g") for k in keys)
    assert m["data/skipped"] == 6 + lost
    if workers == 0:  # logs from worker processes do not reach caplog; each sample is logged below WARNING
        text = "\n".join(r.getMessage() for r in caplog.records if r.name == "data_loaders.skipped")
        assert "undecodable" in text and "key=garbage" in text and "shard-000000.tar" in text
        assert "truncated_tar" in text and "shard-000001.tar" in text
        assert "missing_caption" in text and "key=nocap" in text


def test_too_many_bad_samples_stop_training(bad_set):
    cfg = _cfg(bad_set, max_bad_fraction=0.2, bad_min_samples=5, epochs=None)
    loader = build_loader(cfg, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"max_bad_fraction=0.2.*shard .* key"):
        for _ in range(20):
            next(iter(loader))


def test_bad_fraction_error_crosses_worker_processes(bad_set):
    cfg = _cfg(bad_set, max_bad_fraction=0.2, bad_min_samples=5, epochs=None, num_workers=2, units_per_reader=1)
    loader = build_loader(cfg, 0, 1, seed=0)
    with pytest.raises(DataError, match="were bad"):
        for _ in range(20):
            next(iter(loader))
    loader.close()


def test_shard_without_index_and_missing_shard(tmp_path):
    d = write_set(str(tmp_path / "s"), [video_sample(f"k{i}") for i in range(6)], per_shard=3)
    os.remove(os.path.join(d, "index.json"))
    # a directory of tars without an index: one unit per shard, still read completely
    keys = [k for b in build_loader(_cfg(d, num_workers=0), 0, 1, 0) for k in b["keys"]]
    assert sorted(keys) == [f"k{i}" for i in range(6)]
    # brace patterns / plain paths work the same way
    keys = [k for b in build_loader(_cfg(os.path.join(d, "shard-{000000..000001}.tar")), 0, 1, 0) for k in b["keys"]]
    assert len(keys) == 6
    from data_loaders import DataConfigError

    with pytest.raises(DataConfigError, match=r"data.shards\[0\]: shard .* does not exist"):
        build_loader(_cfg(os.path.join(d, "nope.tar")), 0, 1, 0)
    with pytest.raises(DataConfigError, match="reading units"):
        build_loader(_cfg(d, num_workers=2), 0, 2, 0)  # 2 shards, 4 readers, no counts to split by


def test_pipe_urls(tmp_path):
    d = write_set(str(tmp_path / "p"), [video_sample(f"k{i}") for i in range(4)], per_shard=4)
    keys = [k for b in build_loader(_cfg(f"pipe:cat {d}/shard-000000.tar"), 0, 1, 0) for k in b["keys"]]
    assert sorted(keys) == ["k0", "k1", "k2", "k3"]


def test_failing_pipe_is_counted(tmp_path):
    d = write_set(str(tmp_path / "p"), [video_sample(f"k{i}") for i in range(4)], per_shard=4)
    shards = [f"pipe:cat {d}/shard-000000.tar", f"pipe:cat {d}/does-not-exist.tar"]
    cfg = DataConfig(shards=shards, buckets=[[9, 32, 32]], batch_size=2, num_workers=0, epochs=1, max_bad_fraction=0.9,
                     bad_min_samples=1)
    loader = build_loader(cfg, 0, 1, 0)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == ["k0", "k1", "k2", "k3"]
    # the failed pipe lost a shard's worth of samples, estimated from the one read to its end (4)
    assert loader.metrics()["data/skipped/truncated_tar"] == 4
