"""Video scorers: one interface for evaluation during training, ``lcv-sample`` scores and GRPO rewards.

See ``base.py``. Scorers register themselves by name (``build_scorer("synthetic_compliance")``).
"""

from lcv_train.rewards.base import VideoScorer, build_scorer, register_scorer, scorer_names

__all__ = ["VideoScorer", "build_scorer", "register_scorer", "scorer_names"]
