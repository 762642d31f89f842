"""GRPO for the flow-matching video model, LongCat's variant (SPEC section 6): the public formulas.

``sde.py`` the critical SDE step and its log-probability, ``advantages.py`` the group-normalised
multi-reward advantages, ``loss.py`` the PPO-clipped, reweighted GRPO loss with its KL to the reference,
``rollout.py`` group rollouts (same initial noise, one SDE step per prompt, ODE elsewhere). The stage
that trains with them uses these functions and keeps no copy of the formulas.
"""

from lcv_train.rl.advantages import group_advantages
from lcv_train.rl.loss import STATS, GRPOLossOutput, grpo_loss, grpo_metrics, timestep_weight
from lcv_train.rl.rollout import Rollout, prompt_generator, prompt_line, rollout
from lcv_train.rl.sde import sde_log_prob, sde_step

__all__ = ["STATS", "GRPOLossOutput", "Rollout", "group_advantages", "grpo_loss", "grpo_metrics", "prompt_generator",
           "prompt_line", "rollout", "sde_log_prob", "sde_step", "timestep_weight"]
