"""Flow-matching stages: image pretrain, video pretrain, multi-task, SFT (and the BSA fine-tune).

They share one step: per micro-batch, noise the latents at a logit-normal, token-shifted sigma, predict
``v = x0 - eps`` and take the MSE over the noisy frames; then one optimizer step. What differs between
them is data (task mix, buckets), learning rate and attention operator, which are all config.
"""

from __future__ import annotations

import math

import torch

from lcv_train.diffusion import drop_text, flow_matching_loss, make_training_inputs
from lcv_train.stages.base import Stage, StageBatch, StageConfig, StepContext, register_stage


@register_stage("flow_matching", StageConfig)
class FlowMatchingStage(Stage):
    def __init__(self, cfg: StageConfig, train_cfg):
        super().__init__(cfg, train_cfg)
        self.diffusion = train_cfg.diffusion
        self.patch_size = train_cfg.model.patch_size

    def loss(self, model, batch: StageBatch, generator) -> tuple[torch.Tensor, dict]:
        """The scalar loss of one micro-batch, and scalar metrics."""
        x0 = batch.latents
        T, H, W = x0.shape[2:]
        noisy_tokens = (T - batch.num_cond) * (H * W) // math.prod(self.patch_size[1:])
        inputs = make_training_inputs(x0, batch.num_cond, self.diffusion, noisy_tokens, generator)
        text, mask = drop_text(batch.text, batch.text_mask, self.diffusion.text_dropout, generator)
        v = model(inputs.noisy, inputs.timestep, text, mask, num_cond_latents=batch.num_cond)
        loss = flow_matching_loss(v, inputs.target, batch.num_cond)
        return loss, {"sigma_mean": inputs.sigma.mean().detach()}

    def step(self, ctx: StepContext) -> dict:
        loss_sum = torch.zeros((), device=ctx.device)
        sigma_sum = torch.zeros((), device=ctx.device)
        for _ in range(ctx.grad_accum):
            batch = ctx.next_batch()
            with ctx.engine.autocast():
                loss, m = self.loss(ctx.model, batch, ctx.generator)
            ctx.phase("backward")
            ctx.engine.backward(loss / ctx.grad_accum)
            loss_sum += loss.detach().float()  # on the device: no host sync per micro-batch
            sigma_sum += m["sigma_mean"].float() if "sigma_mean" in m else 0.0
        # Read before the optimizer step: the loss is read there anyway, so this adds no host sync, while
        # after it the read would wait for the optimizer's kernels.
        sigma_mean = float(sigma_sum) / ctx.grad_accum
        metrics = ctx.optimizer_step(loss_sum / ctx.grad_accum)
        metrics["train/sigma_mean"] = sigma_mean
        return metrics
