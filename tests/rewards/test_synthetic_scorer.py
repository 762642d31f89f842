"""The synthetic-world compliance scorer (lcv_train/rewards/synthetic.py) against the clips it judges.

The synthetic set's own clips must score (nearly) 100 %; clips under another clip's caption and pure noise
must score at chance, within binomial tolerances sized by the number of clips and classes: a scorer that
reads the caption instead of the video, or always says "yes", fails the chance tests; one that cannot find
the object fails the first.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_loaders.synthetic import COLOURS, MOTIONS, SHAPES, make_caption, make_clip, parse_caption
from lcv_train.errors import ConfigError
from lcv_train.rewards import build_scorer, scorer_names
from lcv_train.rewards.synthetic import frame_quality

CLASSES = {"colour": len(COLOURS), "shape": len(SHAPES), "motion": len(MOTIONS)}


def _clips(n: int, seed: int, frames: int = 9, size: int = 32):
    rng = np.random.default_rng(seed)
    clips, attrs = zip(*(make_clip(rng, frames, size, size) for _ in range(n)))
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, F, H, W]
    return video, list(attrs)


def _tolerance(p: float, n: int) -> float:
    """Four binomial standard deviations of an accuracy of chance p over n clips (false alarm < 1e-4)."""
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def scorer():
    return build_scorer("synthetic_compliance")


def test_registered_and_interface(scorer):
    assert "synthetic_compliance" in scorer_names()
    video, attrs = _clips(3, seed=1)
    score = scorer(video, [a["caption"] for a in attrs], 8.0)
    assert score.shape == (3,) and score.dtype == torch.float32
    d = scorer.details(video, [a["caption"] for a in attrs], 8.0)
    assert set(d) >= {"compliance", "colour", "shape", "motion", "sharpness", "contrast"}
    assert all(v.shape == (3,) for v in d.values())
    torch.testing.assert_close(d["compliance"], (d["colour"] + d["shape"] + d["motion"]) / 3)


def test_synthetic_clips_comply(scorer):
    """The set's own clips (every colour, shape, direction, plain and gradient backgrounds) at 32x32."""
    video, attrs = _clips(150, seed=2)
    d = scorer.details(video, [a["caption"] for a in attrs], 8.0)
    for key in ("colour", "shape", "motion"):
        assert float(d[key].mean()) >= 0.97, (key, float(d[key].mean()))
    assert float(d["found"].min()) > 0.5


def test_wrong_captions_score_chance(scorer):
    """Each clip judged against the caption of another clip: each accuracy is 1/K within tolerance."""
    n = 240
    video, attrs = _clips(n, seed=3)
    perm = np.random.default_rng(0).permutation(n)
    while (perm == np.arange(n)).any():  # no clip keeps its own caption
        perm = np.random.default_rng(int(perm[0])).permutation(n)
    d = scorer.details(video, [attrs[i]["caption"] for i in perm], 8.0)
    for key, k in CLASSES.items():
        # the exact chance of this draw: how often the other clip's attribute equals this one's
        p = float(np.mean([attrs[i][key if key != "motion" else "motion_direction"]
                           == attrs[j][key if key != "motion" else "motion_direction"] for i, j in enumerate(perm)]))
        assert abs(p - 1 / k) <= _tolerance(1 / k, n)  # the draw itself is near 1/K
        assert abs(float(d[key].mean()) - p) <= _tolerance(1 / k, n) / 2, (key, float(d[key].mean()), p)


def test_noise_scores_at_most_chance(scorer):
    """Uniform noise under the set's captions: colour and shape at most chance (a fixed guess hits 1/K of
    the captions), motion none (noise does not move)."""
    n = 160
    _, attrs = _clips(n, seed=4)
    noise = torch.rand(n, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d = scorer.details(noise, [a["caption"] for a in attrs], 8.0)
    for key, k in CLASSES.items():
        assert float(d[key].mean()) <= 1 / k + _tolerance(1 / k, n), (key, float(d[key].mean()))
    chance = sum(1 / k for k in CLASSES.values()) / 3
    assert float(d["compliance"].mean()) <= chance + _tolerance(chance, n)


@pytest.mark.parametrize("attribute", ["colour", "shape", "motion"])
def test_each_attribute_is_judged_on_its_own(scorer, attribute):
    """Changing one word of the caption zeroes exactly that attribute (catches attributes mixed up)."""
    video, attrs = _clips(24, seed=5)
    captions = []
    for a in attrs:
        parts = {"colour": a["colour"], "shape": a["shape"], "motion": a["motion_direction"]}
        names = {"colour": list(COLOURS), "shape": list(SHAPES), "motion": list(MOTIONS)}[attribute]
        parts[attribute] = names[(names.index(parts[attribute]) + 1) % len(names)]
        captions.append(make_caption(parts["colour"], parts["shape"], parts["motion"], a["background"], a["gradient"]))
    d = scorer.details(video, captions, 8.0)
    assert float(d[attribute].max()) == 0.0
    for other in {"colour", "shape", "motion"} - {attribute}:
        assert float(d[other].mean()) >= 0.95


def test_caption_grammar_round_trip_and_refusal(scorer):
    assert parse_caption("a red circle moves to the right on a black background") == {
        "colour": "red", "shape": "circle", "motion": "to the right"}
    assert parse_caption("a cat on a mat") is None
    video, _ = _clips(1, seed=6)
    with pytest.raises(ConfigError, match="not a synthetic-world caption"):
        scorer(video, ["a cat on a mat"], 8.0)


def test_frame_quality_sharpness_and_contrast():
    video, _ = _clips(2, seed=7)
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    q, qb = frame_quality(video), frame_quality(blurred)
    assert q["sharpness"].shape == (2, 9)
    assert bool((qb["sharpness"] < q["sharpness"]).all())
    flat = torch.zeros(1, 3, 2, 8, 8)
    assert float(frame_quality(flat)["contrast"].abs().max()) == 0.0
