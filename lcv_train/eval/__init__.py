"""Measured quality during training: the validation curve, fixed-prompt sample videos and their scores.

``EvalConfig`` is the ``eval.*`` config section; ``validation_loss`` the deterministic, world-size-independent
flow-matching loss at fixed sigmas; ``Evaluator`` runs both (and the scorers) from the trainer every
``eval.every`` steps and at the end.
"""

from lcv_train.eval.config import EvalConfig
from lcv_train.eval.validation import ValSample, validation_loss

__all__ = ["EvalConfig", "ValSample", "validation_loss"]
