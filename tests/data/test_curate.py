"""``lcv-data curate`` on real generated media (tests/data/_curate_media.py): cuts, crops, dedup,
quality ranking, shards that the loader, ``lcv-data stats`` and ``lcv-train`` read, resume, Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pytest

from tests.optional import require  # noqa: E402

for _module in ("scenedetect", "cv2", "pandas"):  # the curate extra; `.[dev]` has it, CI fails without it
    require(_module)
import pandas as pd  # noqa: E402

from _curate_media import BARS, CUTS, FPS, make_raw_videos  # noqa: E402

from data_loaders.cli import main as lcv_data  # noqa: E402
from data_loaders.curate import CurateConfig, curate  # noqa: E402
from data_loaders.curate.dedup import dedup  # noqa: E402
from data_loaders.curate.driver import KILL_AFTER_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["clip_id", "source", "start_s", "end_s", "duration_s", "width", "height", "fps", "bitrate", "crop_x",
            "crop_y", "crop_w", "crop_h", "md5", "blur", "motion", "caption", "cluster"]


def _cfg(raw: str, out: str, **kw) -> CurateConfig:
    return CurateConfig(input=raw, out=out, **{"workers": 1, "clusters": 3, **kw})


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    d = make_raw_videos(str(tmp_path_factory.mktemp("curate") / "raw"))
    with open(os.path.join(d, "broken.mp4"), "wb") as f:  # bad input: skipped and counted, not fatal
        f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))
    return d


@pytest.fixture(scope="module")
def curated(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("curate") / "out")
    summary = curate(_cfg(raw, out, report=True))
    return out, summary, pd.read_parquet(os.path.join(out, "metadata.parquet"))


def _clips(df, source: str):
    return df[df["source"] == source].sort_values("start_s")


def _decode(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_columns_and_counts(curated):
    out, summary, df = curated
    assert set(REQUIRED) <= set(df.columns)
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["probe"]["dropped"] == {"unreadable": 1}  # broken.mp4
    assert steps["dedup"]["dropped"]["dup_md5"] == 1
    assert sorted(df["source"].unique()) == ["bars.mp4", "blurred.mp4", "cuts.mp4", "sharp.mp4", "static.mp4"]
    assert any("aesthetic: no weights given" in s for s in summary["skipped"])  # scorer skipped, with the reason
    assert {os.path.basename(p) for p in summary["histograms"]} >= {"blur.png", "motion.png"}
    assert abs(df["cluster_weight"].sum() - 1.0) < 1e-9


def test_hard_cuts_found_within_two_frames(curated, raw):
    """Catches a detector fed the wrong frames/colour order, or cuts converted to the wrong times."""
    out, _, df = curated
    c = _clips(df, "cuts.mp4")
    starts = np.round(c["start_s"].to_numpy() * FPS).astype(int)
    assert len(starts) == 3 and np.all(np.abs(starts - np.array((0,) + CUTS)) <= 2), starts
    # the cuts fall on keyframes (keyint 12): clips are stream copies, and bit-exact frames of the source
    assert set(c["cut"]) == {"copy"}
    src = _decode(os.path.join(raw, "cuts.mp4"))
    clip = _decode(os.path.join(out, c.iloc[1]["clip_path"]))
    s = int(round(c.iloc[1]["start_s"] * FPS))
    assert clip.shape[0] == c.iloc[1]["num_frames"] and np.array_equal(clip, src[s:s + len(clip)])


def test_black_bars_cropped(curated):
    out, _, df = curated
    r = _clips(df, "bars.mp4").iloc[0]
    got = (r["crop_x"], r["crop_y"], r["crop_w"], r["crop_h"])
    assert all(abs(int(a) - b) <= 2 for a, b in zip(got, BARS)), got
    frames = _decode(os.path.join(out, r["clip_path"]))
    assert frames.shape[1:3] == (r["crop_h"], r["crop_w"]) and r["cut"] == "reencode"
    luma = frames.mean(axis=3)
    assert luma.max(axis=(0, 2)).min() > 24 and luma.max(axis=(0, 1)).min() > 24  # no black row/column left


def test_duplicates_dropped_by_md5_and_source_id():
    recs = [{"source": "a.mp4", "md5": "1", "source_id": "yt1"}, {"source": "b.mp4", "md5": "1", "source_id": ""},
            {"source": "c.mp4", "md5": "2", "source_id": "yt1"}, {"source": "d.mp4", "md5": "3", "source_id": ""}]
    kept, dropped = dedup(recs)
    assert [r["source"] for r in kept] == ["a.mp4", "d.mp4"]
    assert dropped == {"dup_md5": ["b.mp4"], "dup_source_id": ["c.mp4"]}


def test_blur_and_motion_ranked(curated):
    _, _, df = curated
    q = {s: _clips(df, s).iloc[0] for s in ("sharp.mp4", "blurred.mp4", "static.mp4")}
    assert q["sharp.mp4"]["blur"] > 5 * q["blurred.mp4"]["blur"]
    assert q["static.mp4"]["motion"] < 0.05 * q["sharp.mp4"]["motion"]
    assert q["static.mp4"]["camera_motion"] == "static"
    assert q["blurred.mp4"]["camera_motion"] == "pan right"  # content moves left


def test_captions_augmented(curated):
    _, _, df = curated
    for caps, cap in zip(df["captions"], df["caption"]):
        assert list(caps)[0] == cap and len(caps) >= 2
    assert any("camera: static" in c for c in _clips(df, "static.mp4").iloc[0]["captions"])


def test_shards_stats_mixture_and_filters(curated, capsys):
    """`lcv-data stats` reads the shards; the Hydra mixture file loads; loader filters use the columns."""
    from hydra import compose, initialize_config_dir

    from data_loaders import build_loader, to_data_config

    out, summary, df = curated
    dirs = list(summary["shards"].values())
    assert lcv_data(["stats", *dirs, "--buckets", "5x32x32", "--fps", "8", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == len(df) and {"blur", "motion", "crop_w"} <= set(st["metadata"])
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{out}/conf]", "data=curated"])
    subsets = cfg.data.subsets
    assert set(subsets) == {f"cluster_{c:03d}" for c in df["cluster"].unique()}
    counts = df["cluster"].value_counts()
    ratios = {c: counts[c] ** 0.5 / sum(counts ** 0.5) for c in counts.index}
    for c, r in ratios.items():
        assert abs(subsets[f"cluster_{c:03d}"].ratio - r) < 1e-5
    to_data_config({"subsets": {k: dict(v) for k, v in subsets.items()}})  # a valid mixture
    data = {"shards": dirs, "filters": {"ranges": {"blur": [100.0, None]}}, "buckets": [[5, 32, 32]], "fps": 8.0,
            "batch_size": 1, "num_workers": 0, "epochs": 1, "shuffle": False, "temporal_stride": 1}
    loader = build_loader(to_data_config(data), 0, 1, 0)
    keys = {k for b in loader for k in b["keys"]}
    loader.close()
    assert keys == set(df[df["blur"] >= 100]["clip_id"]) and _clips(df, "blurred.mp4").iloc[0]["clip_id"] not in keys


@pytest.mark.slow
def test_shards_train(curated, tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "training"))
    from _runs import losses, tiny_overrides, train_here

    out, summary, _ = curated
    shards = ",".join(summary["shards"].values())
    o = tiny_overrides(tmp_path, tmp_path / "syn") + ["data=shards", f"data.shards=[{shards}]", "data.num_workers=0",
                                                     "data.batch_sizes=[]",  # stage video_pretrain sets 4 for its 4 buckets
                                                     "data.fps=8.0", "data.batch_size=2", "trainer.max_steps=2",
                                                     "trainer.sample_at_end=false", "run.name=curated"]
    train_here(o)
    loss = losses(tmp_path / "curated")
    assert sorted(loss) == [1, 2] and all(np.isfinite(v) for v in loss.values())


def test_interrupted_run_resumes_without_redoing_files(raw, curated, tmp_path):
    """A run killed (SIGKILL) after two files: the rerun (on a pool of 2 processes) redoes neither and ends
    with the same table as the uninterrupted run in one process."""
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **{KILL_AFTER_ENV: "2"})
    p = subprocess.run([sys.executable, "-m", "data_loaders.cli", "curate", "--input", raw, "--out", out,
                        "--workers", "1", "--clusters", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "metadata.parquet"))
    files = Path(out, "work", "files")
    before = {f.name: f.stat().st_mtime_ns for f in files.glob("*.parquet")}
    assert len(before) == 2
    summary = curate(_cfg(raw, out, workers=2))  # the rest on the process pool
    assert summary["files_resumed"] == 2 and summary["files_processed"] == 3
    assert {f: files.joinpath(f).stat().st_mtime_ns for f in before} == before
    again = curate(_cfg(raw, out))
    assert again["files_resumed"] == 5 and again["files_processed"] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, "metadata.parquet")), curated[2])


def test_failing_file_is_counted_and_retried(raw, tmp_path, monkeypatch):
    """A file that fails after probing (corrupt past its header) is counted, leaves no done marker, and the
    next run retries only it."""
    import data_loaders.curate.work as work

    two = tmp_path / "two"
    two.mkdir()
    for name in ("cuts.mp4", "cuts.json", "bars.mp4", "bars.json"):
        os.link(os.path.join(raw, name), two / name)
    real = work.analyse

    def failing(path, *a, **k):
        if path.endswith("bars.mp4"):
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        return real(path, *a, **k)

    monkeypatch.setattr(work, "analyse", failing)
    s1 = curate(_cfg(str(two), str(tmp_path / "out")))
    assert {x["name"]: x["dropped"] for x in s1["steps"]}["files"] == {"failed": 1} and s1["clips"] == 3
    monkeypatch.setattr(work, "analyse", real)
    s2 = curate(_cfg(str(two), str(tmp_path / "out")))
    assert s2["files_resumed"] == 1 and s2["files_processed"] == 1 and s2["clips"] == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_model_scorer_captioner_and_translation_hooks(raw, tmp_path):
    """A local TorchScript scorer fills its column; a captioner and a translation hook are called."""
    import torch

    class Brightness(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))

    weights = str(tmp_path / "aesthetic.pt")
    torch.jit.script(Brightness()).save(weights)
    one = tmp_path / "one"
    one.mkdir()
    os.link(os.path.join(raw, "static.mp4"), one / "static.mp4")  # no sidecar: the captioner must caption it
    cfg = CurateConfig(input=str(one), out=str(tmp_path / "out"), workers=1, scorers={"aesthetic": weights},
                       captioner="_curate_media:caption_hook", translate="_curate_media:translate_hook",
                       steps=["scorers", "captions", "augment", "quality"])
    curate(cfg)
    df = pd.read_parquet(tmp_path / "out" / "metadata.parquet")
    assert len(df) == 1
    r = df.iloc[0]
    frame = _decode(os.path.join(raw, "static.mp4"))[0]
    assert abs(r["aesthetic"] - frame.mean() / 255.0) < 0.01
    assert r["caption"] == "captioned 8 frames" and r["caption_source"] == "captioner"
    assert "[zh] captioned 8 frames" in list(r["captions"]) and r["shot_size"] == "close-up"
    assert "text_coverage" not in df and "cluster" in df


def test_bad_options_exit_2(tmp_path, capsys):
    assert lcv_data(["curate", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    assert lcv_data(["curate", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "scenes,bogus"]) == 2


@pytest.mark.slow
def test_ray_engine_gives_the_same_table(raw, curated, tmp_path):
    """`ray start --head` on this machine; the same input through --engine ray gives the same table."""
    require("ray")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = tmp_path / "ray.log"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=false",
                             f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={ray_tmp}",
                             "--disable-usage-stats"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.25)
        out = str(tmp_path / "out")
        p = subprocess.run([sys.executable, "-m", "data_loaders.cli", "curate", "--input", raw, "--out", out,
                            "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--clusters", "3"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # only the head this test started (its own session)
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads(Path(out, "report.json").read_text())
    assert summary["engine"] == "ray"
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, "metadata.parquet")), curated[2])


def test_clusters_and_weights_tfidf():
    """Captions on two topics fall into two clusters; ratios follow n_c**balance (closed form)."""
    from data_loaders.curate.cluster import cluster_ratios, embed, kmeans_labels

    texts = ["a red car drives on a road", "a red car parked on the road", "a fast red car on a wet road",
             "a red sports car on a mountain road", "blue ocean waves at sunset", "calm blue ocean waves"]
    x, method, why = embed(texts, None)
    labels = kmeans_labels(x, 2, seed=0)
    assert method == "tfidf" and why is None and list(labels) == [0, 0, 0, 0, 1, 1]
    r = cluster_ratios(labels, 0.5)
    assert abs(r[0] - 2 / (2 + 2 ** 0.5)) < 1e-12 and abs(r[0] + r[1] - 1) < 1e-12
    assert cluster_ratios(labels, 0.0) == {0: 0.5, 1: 0.5}
    _, method, why = embed(texts, "/nonexistent/model")
    assert method == "tfidf" and "cannot use /nonexistent/model" in why


def test_local_sentence_embedding_model(tmp_path):
    """A local model directory (here a tiny random BERT) embeds the captions instead of TF-IDF."""
    import transformers
    from data_loaders.curate.cluster import embed

    words = "a red car drives on road blue ocean waves".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "m")
    cfg = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "m")
    x, method, why = embed(["a red car", "blue ocean waves"], str(tmp_path / "m"))
    assert method == "sentence-embedding" and why is None and x.shape == (2, 16)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
