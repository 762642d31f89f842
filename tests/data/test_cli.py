"""lcv-data pack / synth / stats / encode, through main(argv) and one subprocess run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _datakit import ramp_clip
from data_loaders import DataConfig, build_loader
from data_loaders.cli import main
from data_loaders.decode import encode_jpg, encode_mp4

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(encode_mp4(ramp_clip(12, 32, 48), 8.0))
    (media / "b.mp4").write_bytes(encode_mp4(ramp_clip(9, 32, 32), 8.0))
    (media / "c.jpg").write_bytes(encode_jpg(np.full((32, 32, 3), 200, np.uint8)))
    (media / "bad.mp4").write_bytes(b"not a video at all")
    rows = [
        {"path": "media/a.mp4", "caption": "a wide clip", "aesthetic": "5.5", "source_id": "yt:1", "camera": "pan left"},
        {"path": "media/b.mp4", "caption": "a square clip", "aesthetic": "3.0", "source_id": "yt:2", "camera": ""},
        {"path": "media/c.jpg", "caption": "a grey image", "aesthetic": "6", "source_id": "img:3", "camera": ""},
        {"path": "media/missing.mp4", "caption": "gone", "aesthetic": "1", "source_id": "x", "camera": ""},
        {"path": "media/bad.mp4", "caption": "broken", "aesthetic": "1", "source_id": "y", "camera": ""},
        {"path": "media/b.mp4", "caption": "", "aesthetic": "1", "source_id": "z", "camera": ""},
    ]
    path = tmp_path / "clips.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_pack_keeps_metadata_and_reads_back(tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert main(["pack", "--input", _table(tmp_path), "--out", out, "--shard-size", "10KB"]) == 0
    printed = capsys.readouterr().out
    assert "packed 3 samples" in printed and "missing_file=1" in printed and "undecodable=1" in printed
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["complete"] and index["total"] == 3 and sum(s["count"] for s in index["shards"]) == 3
    cfg = DataConfig(shards=[out], buckets=[[9, 32, 48], [9, 32, 32], [1, 32, 32]], batch_size=1, num_workers=0, epochs=1)
    batches = {b["caption"][0]: b for b in build_loader(cfg, 0, 1, 0)}
    assert set(batches) == {"a wide clip", "a square clip", "a grey image"}
    assert batches["a wide clip"]["bucket"] == (9, 32, 48)
    assert batches["a grey image"]["bucket"] == (1, 32, 32)
    # metadata columns survive, typed; probed geometry is added
    from data_loaders.shards import Unit, iter_unit

    metas = []
    for s in index["shards"]:
        for raw in iter_unit(Unit(os.path.join(out, s["path"]), 0, s["count"], 0)):
            metas.append(json.loads(raw["json"]))
    a = next(m for m in metas if m["caption"] == "a wide clip")
    assert a["aesthetic"] == 5.5 and a["source_id"] == "yt:1" and a["camera"] == "pan left"
    assert a["width"] == 48 and a["height"] == 32 and a["num_frames"] == 12 and a["fps"] == pytest.approx(8.0)
    # filters use the packed metadata
    cfg.filters.min_aesthetic = 5.0
    assert {b["caption"][0] for b in build_loader(cfg, 0, 1, 0)} == {"a wide clip", "a grey image"}


def test_synth_and_stats(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["synth", "--out", out, "--n", "40", "--frames", "9-12", "--image-fraction", "0.25", "--seed", "3"]) == 0
    assert main(["stats", out, "--buckets", "9x32x32,1x32x32", "--fps", "8"]) == 0
    text = capsys.readouterr().out
    assert "samples: 40 usable of 40 read" in text and "9x32x32" in text and "1x32x32" in text
    assert "aesthetic" in text and "by subset" in text
    assert main(["stats", out, "--buckets", "9x32x32,1x32x32", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == 40 and sum(st["by_bucket"].values()) == 40
    assert st["by_subset"].get("image", 0) + st["by_subset"]["video"] == 40
    assert st["metadata"]["num_frames"]["min"] >= 9 and st["metadata"]["num_frames"]["max"] <= 12
    # a bucket longer than every clip: all videos counted as too short
    assert main(["stats", out, "--buckets", "17x32x32", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == 0 and st["skipped"]["too_short"] == 40


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcv-data stats: error:") and "does not exist" in err


def test_subprocess_synth(tmp_path):
    out = str(tmp_path / "syn")
    r = subprocess.run([sys.executable, "-m", "data_loaders.cli", "synth", "--out", out, "--n", "8", "--frames", "9"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "index.json"))


class _FakeCodec:
    temporal_stride = 4
    spatial_stride = 8
    latent_channels = 4

    def encode(self, video):
        B, _, F, H, W = video.shape
        T = 1 + (F - 1) // 4
        pooled = torch.nn.functional.avg_pool3d(video, (1, 8, 8))[:, :, :: 4][:, :, :T]
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


class _FakeText:
    def encode(self, captions):
        L, D = 12, 6
        emb = torch.zeros(len(captions), L, D)
        mask = torch.zeros(len(captions), L, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = min(L, len(c.split()) + 1)
            emb[i, :n] = float(len(c))
            mask[i, :n] = True
        return emb, mask


def test_encode_then_train_on_latents(syn_dir, tmp_path):
    from data_loaders.encode import encode_shards

    out = str(tmp_path / "lat")
    data = DataConfig(buckets=[[9, 32, 32], [1, 32, 32]], batch_size=4, fps=8.0)
    summary = encode_shards([syn_dir], out, _FakeCodec(), _FakeText(), data, shard_size="100KB", num_workers=0)
    assert summary["written"] == 64 and summary["shards"] >= 2
    # the same data config reads pixel shards or cached shards
    cfg = DataConfig(shards=[out], buckets=[[9, 32, 32], [1, 32, 32]], batch_size=4, num_workers=2, epochs=1,
                     tasks={"t2v": 0.5, "vc": 0.5}, vc_cond_latents=[1, 4])
    loader = build_loader(cfg, 0, 1, 0)
    keys = []
    for b in loader:
        assert set(b) == {"latents", "text", "text_mask", "num_cond_latents", "task", "bucket", "keys", "subset"}
        B = len(b["keys"])
        T = 3 if b["bucket"][0] == 9 else 1
        assert b["latents"].shape == (B, 4, T, 4, 4) and b["latents"].dtype == torch.float32
        assert b["text"].shape == (B, 12, 6) and b["text_mask"].shape == (B, 12) and b["text_mask"].dtype == torch.bool
        assert b["num_cond_latents"] < T or T == 1
        assert (b["text"][~b["text_mask"]] == 0).all()
        keys += b["keys"]
    assert len(keys) == 64 and len(set(keys)) == 64


def test_encode_split_over_processes(syn_dir, tmp_path):
    from data_loaders.encode import encode_shards

    data = DataConfig(buckets=[[9, 32, 32], [1, 32, 32]], batch_size=4, fps=8.0)
    outs = [str(tmp_path / f"part{r}") for r in range(2)]
    written = [encode_shards([syn_dir], outs[r], _FakeCodec(), _FakeText(), data, num_workers=0, rank=r, world_size=2)["written"]
               for r in range(2)]
    assert sum(written) == 64 and min(written) > 0
    cfg = DataConfig(shards=outs, buckets=[[9, 32, 32], [1, 32, 32]], batch_size=8, num_workers=0, epochs=1)
    keys = [k for b in build_loader(cfg, 0, 1, 0) for k in b["keys"]]
    assert len(keys) == 64 and len(set(keys)) == 64


def test_encode_cli_with_standins(syn_dir, tmp_path, capsys):
    sub = str(tmp_path / "small")
    assert main(["synth", "--out", sub, "--n", "6", "--frames", "9"]) == 0
    out = str(tmp_path / "lat")
    rc = main(["encode", "--shards", sub, "--out", out, "--buckets", "9x32x32", "--batch-size", "6",
               "--config-dir", os.path.join(REPO, "conf"), "vae=pixel", "text_encoder=tiny_umt5"])
    assert rc == 0, capsys.readouterr().err
    cfg = DataConfig(shards=[out], buckets=[[9, 32, 32]], batch_size=3, num_workers=0, epochs=1, temporal_stride=1)
    batches = list(build_loader(cfg, 0, 1, 0))
    assert sum(len(b["keys"]) for b in batches) == 6
    import yaml

    max_length = yaml.safe_load(open(os.path.join(REPO, "conf", "text_encoder", "tiny_umt5.yaml")))["max_length"]
    assert batches[0]["latents"].shape[2] == 9 and batches[0]["text"].shape[1] == max_length  # the config's tokens
