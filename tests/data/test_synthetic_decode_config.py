"""The synthetic set (idempotent, atomic, multi-process safe), PyAV decoding, config validation."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest
from omegaconf import OmegaConf

from _datakit import image_sample, ramp_clip
from data_loaders import DataConfig, DataConfigError, ensure_synthetic_shards, latent_frames, to_data_config, validate
from data_loaders.decode import DecodeError, decode_image, decode_video, encode_mp4, probe_video

# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_idempotent_and_atomic(tmp_path):
    out = str(tmp_path / "syn")
    args = dict(n=20, frames=(8, 16), height=32, width=32, fps=8.0, seed=0)
    assert ensure_synthetic_shards(out, **args) == out
    index = os.path.join(out, "index.json")
    stamp = os.stat(index).st_mtime_ns
    ensure_synthetic_shards(out, **args)
    assert os.stat(index).st_mtime_ns == stamp  # complete: nothing rewritten
    assert sorted(os.listdir(tmp_path)) == ["syn", "syn.lock"]  # no temp dirs left behind
    ensure_synthetic_shards(out, **{**args, "n": 24})  # other parameters: replaced
    import json

    with open(index) as f:
        assert json.load(f)["total"] == 24
    assert sorted(os.listdir(tmp_path)) == ["syn", "syn.lock"]


def _make(out, q):
    try:
        ensure_synthetic_shards(out, n=30, frames=9, height=32, width=32, fps=8.0, seed=4)
        q.put("ok")
    except Exception as e:  # noqa: BLE001
        q.put(repr(e))


def test_synthetic_concurrent_writers(tmp_path):
    out = str(tmp_path / "syn")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_make, args=(out, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [q.get(timeout=5) for _ in procs] == ["ok"] * 3
    import json

    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["total"] == 30
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d or ".old-" in d]


def test_synthetic_rank_nonzero_waits_for_rank0(tmp_path):
    out = str(tmp_path / "syn")
    args = dict(n=10, frames=9, height=32, width=32, fps=8.0, seed=0)
    result = {}
    t = threading.Thread(target=lambda: result.update(p=ensure_synthetic_shards(out, **args, rank=1, world_size=2, timeout=60)))
    t.start()
    ensure_synthetic_shards(out, **args, rank=0, world_size=2)
    t.join(60)
    assert result["p"] == out
    with pytest.raises(TimeoutError):
        ensure_synthetic_shards(str(tmp_path / "never"), **args, rank=1, world_size=2, timeout=0.5)


# ----------------------------------------------------------------------------------------- decoding


def _frame_ids(video: np.ndarray) -> list[int]:
    return [int(round((float(f.mean()) - 8) / 12)) for f in video]


def test_decode_at_target_fps_and_offset():
    data = encode_mp4(ramp_clip(16, 32, 32), fps=16.0)
    info = probe_video(data)
    assert info["num_frames"] == 16 and info["fps"] == pytest.approx(16.0) and info["width"] == 32
    assert _frame_ids(decode_video(data, 8, 32, 32, fps=16.0)) == list(range(8))
    assert _frame_ids(decode_video(data, 8, 32, 32, fps=8.0)) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert _frame_ids(decode_video(data, 4, 32, 32, fps=8.0, start=0.5)) == [8, 10, 12, 14]
    assert _frame_ids(decode_video(data, 6, 32, 32, fps=32.0)) == [0, 0, 1, 1, 2, 2]  # slower source: repeats
    with pytest.raises(DecodeError, match="only"):
        decode_video(data, 9, 32, 32, fps=8.0)  # 16 frames at 16 fps = 1 s = 8 frames at 8 fps


def test_resize_and_center_crop():
    clip = np.zeros((2, 32, 64, 3), np.uint8)
    clip[:, :, 16:48] = 255  # the middle half is white
    v = decode_video(encode_mp4(clip, 8.0), 2, 16, 16, fps=8.0)
    assert v.shape == (2, 16, 16, 3)
    assert v.mean() > 230  # the crop kept the middle (white) part
    img = image_sample("x", height=40, width=20)["jpg"]
    assert decode_image(img, 32, 16).shape == (1, 32, 16, 3)
    with pytest.raises(DecodeError):
        decode_video(b"\x00" * 100, 2, 16, 16, fps=8.0)
    with pytest.raises(DecodeError):
        decode_image(b"garbage", 16, 16)


# ----------------------------------------------------------------------------------------- config


def test_latent_frames():
    assert latent_frames(93, 4) == 24 and latent_frames(1, 4) == 1 and latent_frames(9, 1) == 9


@pytest.mark.parametrize(
    "change,match",
    [
        ({"buckets": [[9, 32, 32], [9, 32, 32]]}, r"data.buckets\[1\]: duplicate"),
        ({"buckets": [[9, 32, 32], [1, 32, 32], [9, 30, 32]]}, r"data.buckets\[2\]: height 30 is not a multiple of 16"),
        ({"buckets": [[8, 32, 32]]}, r"data.buckets\[0\]: frames 8 is not 1 \+ a multiple of temporal_stride 4"),
        ({"buckets": [[9, 32]]}, r"data.buckets\[0\]: expected \[frames, height, width\]"),
        ({"tasks": {"t2i": 1.0}}, r"data.tasks.t2i: unknown task"),
        ({"tasks": {"t2v": 0.0}}, r"data.tasks: probabilities sum to 0"),
        ({"tasks": {"vc": 1.0}, "buckets": [[1, 32, 32]]}, r"data.vc_cond_latents: min 1 condition latents leaves no noisy"),
        ({"batch_sizes": [1]}, r"data.batch_sizes: needs one entry per bucket"),
        ({"max_bad_fraction": 1.5}, r"data.max_bad_fraction"),
        ({"shards": []}, r"data.shards: no data"),
        ({"subsets": {"v": {"shards": ["x"], "ratio": 0}}}, r"data.shards: give either"),
        ({"filters": {"ranges": {"blur": [0.5, 0.1]}}}, r"data.filters.ranges.blur: low 0.5 > high 0.1"),
        ({"filters": {"media": ["audio"]}}, r"data.filters.media\[0\]: unknown media"),
        ({"nonsense": 1}, r"data.nonsense: unknown key"),
    ],
)
def test_config_errors_name_the_key(change, match):
    d = {"shards": ["somewhere"], **change}
    with pytest.raises(DataConfigError, match=match):
        validate(to_data_config(d))


def test_config_from_hydra_structured_and_dict():
    structured = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(structured, OmegaConf.create({"shards": ["/x"], "subsets": {}, "buckets": [[93, 480, 832]],
                                                           "filters": {"min_aesthetic": 4.5}}))
    cfg = validate(to_data_config(merged))
    assert cfg.buckets == [[93, 480, 832]] and cfg.filters.min_aesthetic == 4.5
    mix = to_data_config({"subsets": {"v": {"shards": ["a"], "ratio": 0.7, "filters": {"min_motion": 0.1}},
                                      "i": {"shards": ["b"], "ratio": 0.3}}})
    validate(mix)
    assert mix.subsets["v"].filters.min_motion == 0.1
    with pytest.raises(DataConfigError, match=r"data.subsets.i.ratio: must be > 0"):
        validate(to_data_config({"subsets": {"i": {"shards": ["b"], "ratio": 0.0}}}))
