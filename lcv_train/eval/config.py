"""``eval.*``: measured quality during training (validation curve, fixed-prompt samples, scorers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lcv_train.errors import require


@dataclass
class EvalConfig:
    # Evaluate every k steps (0: never during the run) and, with at_end, after the last step.
    every: int = 0
    at_end: bool = True
    # The validation curve: flow-matching loss at these sigmas on the held-out set, the same noise for a
    # sample at every evaluation and on every world size.
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    shards: list[str] = field(default_factory=list)  # held-out set; [] with synthetic.enabled: made with synthetic_seed
    samples: int = 64  # validation samples read from the held-out set (its first ones, in shard order)
    batch_size: int = 8  # per rank, for the validation forward passes and the sample videos
    seed: int = 1234  # the validation noise and the sample videos' starting noise
    synthetic_seed: int = 1000003  # the held-out synthetic set's seed (never the training set's)
    synthetic_n: int = 64
    # Sample videos (EMA weights, sample.* sampler settings). prompts: [] = the first `num_prompts` captions
    # of the held-out set (or sample.captions when there is no held-out set).
    prompts: list[str] = field(default_factory=list)
    num_prompts: int = 16
    videos: bool = True  # save the sample videos (eval/step_N.mp4 and a frame strip PNG) and log them to W&B
    scorers: list[str] = field(default_factory=list)  # lcv_train.rewards names, scored on the sample videos

    def validate(self) -> "EvalConfig":
        require(self.every >= 0, "eval.every", f"must be >= 0 (0 = only at the end), got {self.every}")
        require(all(0.0 < s < 1.0 and math.isfinite(s) for s in self.sigmas), "eval.sigmas",
                f"every sigma must be in (0, 1), got {self.sigmas}")
        require(self.samples >= 0, "eval.samples", f"must be >= 0 (0 = no validation loss), got {self.samples}")
        require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.synthetic_n >= 1, "eval.synthetic_n", f"must be >= 1, got {self.synthetic_n}")
        require(self.num_prompts >= 0, "eval.num_prompts", f"must be >= 0, got {self.num_prompts}")
        if self.scorers:
            from lcv_train.rewards import scorer_names

            known = scorer_names()
            for name in self.scorers:
                require(name in known, "eval.scorers", f"unknown scorer {name!r} (known: {', '.join(known)})")
        return self

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_end

    def due(self, step: int, max_steps: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == max_steps)
