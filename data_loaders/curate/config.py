"""The curation configuration: one dataclass, validated once with errors that name the option."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

# Steps a user may select with --steps (probing and cutting always run: they make the clips).
STEPS = ("dedup", "scenes", "crop", "quality", "scorers", "captions", "augment", "cluster", "shards")
ENGINES = ("local", "ray")
SCORER_COLUMNS = ("aesthetic", "text_coverage", "watermark")


class CurateConfigError(ValueError):
    """A curation option is wrong; the message names it and the fix."""


@dataclass
class CurateConfig:
    input: str = ""
    out: str = ""
    steps: List[str] = field(default_factory=lambda: list(STEPS))
    engine: str = "local"
    workers: int = 0  # local: processes (0 = CPU count); ray: ignored (the cluster decides)
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS or "auto" (an existing cluster)
    seed: int = 0
    # scenes: PySceneDetect's content detector; TransNetV2 when its package and weights are present
    scene_detector: str = "auto"  # auto | content | transnetv2
    scene_threshold: float = 27.0
    transnet_weights: Optional[str] = None
    min_scene_frames: int = 3
    min_clip_s: float = 0.5
    max_clip_s: float = 10.0
    # black borders: a row/column is border when its brightest sampled pixel is <= crop_limit
    crop_limit: int = 24
    # quality: frames sampled at this rate, analysed at most analysis_size pixels on the long side
    sample_fps: float = 4.0
    analysis_size: int = 320
    scorers: Dict[str, str] = field(default_factory=dict)  # aesthetic|text_coverage|watermark -> TorchScript file
    captioner: Optional[str] = None  # "pkg.module:function" or a local transformers image-to-text model dir
    translate: Optional[str] = None  # "pkg.module:function" (text, lang) -> text, for caption augmentation
    translate_langs: List[str] = field(default_factory=lambda: ["zh"])
    embedder: Optional[str] = None  # local sentence-embedding model dir; TF-IDF when None
    clusters: int = 8
    cluster_balance: float = 0.5  # subset ratio ~ clips**balance: 0 = every cluster equal, 1 = as found
    # cutting: stream copy when the clip starts and ends on keyframes and needs no crop, else libx264
    crf: int = 18
    preset: str = "veryfast"
    shard_size: str = "1GB"
    report: bool = False

    def step(self, name: str) -> bool:
        return name in self.steps

    @property
    def work_dir(self) -> str:
        return os.path.join(self.out, "work")


def validate(cfg: CurateConfig) -> CurateConfig:
    if not cfg.input or not os.path.isdir(cfg.input):
        raise CurateConfigError(f"--input {cfg.input!r}: not a directory (give the folder of raw videos)")
    if not cfg.out:
        raise CurateConfigError("--out: give the output folder")
    for s in cfg.steps:
        if s not in STEPS:
            raise CurateConfigError(f"--steps: unknown step {s!r} (known: {', '.join(STEPS)})")
    if cfg.engine not in ENGINES:
        raise CurateConfigError(f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}")
    if cfg.scene_detector not in ("auto", "content", "transnetv2"):
        raise CurateConfigError(f"--scene-detector {cfg.scene_detector!r}: use auto, content or transnetv2")
    for k in cfg.scorers:
        if k not in SCORER_COLUMNS:
            raise CurateConfigError(f"--scorer {k}=...: unknown scorer (known: {', '.join(SCORER_COLUMNS)})")
    if cfg.workers < 0:
        raise CurateConfigError(f"--workers {cfg.workers}: must be >= 0 (0 = one per CPU)")
    if not 0 < cfg.min_clip_s <= cfg.max_clip_s:
        raise CurateConfigError(f"--min-clip-s {cfg.min_clip_s} / --max-clip-s {cfg.max_clip_s}: need 0 < min <= max")
    if cfg.sample_fps <= 0 or cfg.analysis_size < 16:
        raise CurateConfigError("--sample-fps must be > 0 and --analysis-size >= 16")
    if cfg.clusters < 1:
        raise CurateConfigError(f"--clusters {cfg.clusters}: must be >= 1")
    if not 0 <= cfg.cluster_balance <= 1:
        raise CurateConfigError(f"--cluster-balance {cfg.cluster_balance}: must be in [0, 1]")
    return cfg
