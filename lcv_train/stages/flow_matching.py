"""Flow-matching stages: image pretrain, video pretrain, multi-task, SFT, BSA fine-tune.

They share one loss (MSE to ``x0 - eps`` on the noisy frames) and differ in data (task mix, buckets),
learning rate and attention operator, which are all config.
"""

from __future__ import annotations

import math

from lcv_train.diffusion import drop_text, flow_matching_loss, make_training_inputs
from lcv_train.stages.base import Stage, StageBatch


class FlowMatchingStage(Stage):
    def __init__(self, cfg, diffusion_cfg, patch_size, lora=None):
        super().__init__(cfg, lora)
        self.diffusion = diffusion_cfg
        self.patch_size = patch_size

    def loss(self, model, batch: StageBatch, generator):
        x0 = batch.latents
        T, H, W = x0.shape[2:]
        noisy_tokens = (T - batch.num_cond) * (H * W) // math.prod(self.patch_size[1:])
        inputs = make_training_inputs(x0, batch.num_cond, self.diffusion, noisy_tokens, generator)
        text, mask = drop_text(batch.text, batch.text_mask, self.diffusion.text_dropout, generator)
        v = model(inputs.noisy, inputs.timestep, text, mask, num_cond_latents=batch.num_cond)
        loss = flow_matching_loss(v, inputs.target, batch.num_cond)
        return loss, {"sigma_mean": float(inputs.sigma.mean())}
