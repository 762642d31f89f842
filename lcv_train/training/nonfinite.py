"""Non-finite training steps: caught every step, skipped up to a limit, never published.

A step is non-finite when its loss (on any rank) or its global gradient norm is NaN or inf. Its update is
skipped (the engine drops the gradients; the step still counts, its data is consumed and the lr schedule
moves on). More than ``trainer.skip_nonfinite_steps`` such steps in a row stop the run with one line naming
the step (``TrainingDiverged``, exit code 2). Under DeepSpeed ZeRO, which clips and updates in one call, a
non-finite step cannot be skipped, so the first one stops the run. Before every checkpoint the weights are
checked: a non-finite model is never written, so ``keep_last`` never rotates good checkpoints out for bad.

Cost: the loss is accumulated on the device and read once per step (no host sync per micro-batch); the
trainer's one all-reduce per step (the data-parallel mean of the loss, ``Trainer._optimizer_step``) makes
every rank take the same decision: a non-finite loss on any rank makes the mean non-finite.
"""

from __future__ import annotations

import logging
import math

import torch

from lcv_train.errors import TrainingDiverged
from parallel.dims import any_rank

log = logging.getLogger("lcv_train")


class NonFiniteGuard:
    """Counts non-finite steps in a row and stops the run when there are too many."""

    def __init__(self, max_skipped_in_a_row: int, can_skip: bool):
        self.limit = max_skipped_in_a_row if can_skip else 0
        self.can_skip = can_skip
        self.in_a_row = 0
        self.skipped = 0  # in this process's lifetime (a metric)

    def after_step(self, step: int, loss: float, grad_norm: float, loss_finite: bool) -> bool:
        """Record step ``step``; True when its update was skipped. Raises ``TrainingDiverged`` past the limit."""
        if loss_finite and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if self.in_a_row > self.limit:
            why = (f"{self.in_a_row} non-finite steps in a row, more than trainer.skip_nonfinite_steps={self.limit}"
                   if self.can_skip else "the ZeRO engine cannot skip a non-finite update")
            raise TrainingDiverged(f"step {step}: {what} is not finite ({why}); no checkpoint was written after it. "
                                   f"Lower optim.lr or check the data, then resume from the last checkpoint")
        log.warning("step %d: %s is not finite: update skipped (%d in a row, at most %d)", step, what,
                    self.in_a_row, self.limit)
        return True

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Raise ``TrainingDiverged`` rather than let a checkpoint of non-finite weights be written."""
        finite = [torch.isfinite(t).all() for t in (_local(p) for p in model.parameters()) if t.numel()]
        ok = bool(torch.stack(finite).all()) if finite else True
        if any_rank(not ok):
            raise TrainingDiverged(f"step {step}: the model's weights are not finite; not writing a checkpoint (the "
                                   f"last one on disk is intact). Lower optim.lr and resume from it")


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t
