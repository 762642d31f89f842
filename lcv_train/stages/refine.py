"""The refinement expert (``stage=refine_lora``, SPEC section 4.6): a LoRA on the base model that turns a
low-resolution, low-frame-rate clip into the high-resolution, high-frame-rate one (480p / 15 fps ->
720p / 30 fps in coarse-to-fine generation).

Per micro-batch: the loader's clip at the high resolution and frame rate is the target ``x0`` (its latents);
the refiner's input is made on the fly from it in pixel space, as inference makes it from stage 1's output
(``lcv_train.diffusion.refine``: every ``temporal_factor``-th frame at ``1 / spatial_factor`` the size,
bilinear per frame and linear in time back to the clip's size and frame count, encoded by the codec to
``z_up``); then flow matching on the straight line from ``x_s = t_s * eps + (1 - t_s) * z_up`` to ``x0`` in
the published velocity sign (``make_refine_inputs``: timestep ``1000 * sigma``, target ``(x0 - x_s) / t_s``).
I2V / VC condition frames stay the clean high-resolution latents. No text dropout: the refiner runs without
CFG.

Shards of pre-encoded latents hold no pixels: each batch is decoded by the codec first (the VAE's
reconstruction stands in for the clip), logged once. BSA comes from ``model.attention=bsa`` (the stage's YAML
sets it); the LoRA (``lora.rank``, 128 / alpha 64 in the YAML) is required: only it trains, and only it and its
EMA are checkpointed (``lcv_train.lora``, the trainer's LoRA mode).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lcv_train.diffusion import flow_matching_loss, make_refine_inputs, refine_input_video, sample_refine_sigmas
from lcv_train.errors import require
from lcv_train.stages.base import Stage, StageBatch, StageConfig, StepContext, register_stage

log = logging.getLogger("lcv_train")


@dataclass
class RefineStageConfig(StageConfig):
    name: str = "refine_lora"
    kind: str = "refine"
    t_start: float = 0.5  # the input's noise level: inference starts the refiner at timestep 500
    spatial_factor: float = 1.5  # high / low resolution (720p / 480p)
    temporal_factor: int = 2  # high / low frame rate (30 / 15 fps)
    # sigma = t_start * sigmoid(N(mean, std)): where on the line from x_s to x0 each sample trains
    sigma_logit_mean: float = 0.0
    sigma_logit_std: float = 1.0

    def validate(self) -> "RefineStageConfig":
        super().validate()
        require(0.0 < self.t_start <= 1.0, "stage.t_start", f"must be in (0, 1], got {self.t_start}")
        require(math.isfinite(self.spatial_factor) and self.spatial_factor >= 1.0, "stage.spatial_factor",
                f"must be >= 1 (high / low resolution), got {self.spatial_factor}")
        require(self.temporal_factor >= 1, "stage.temporal_factor",
                f"must be >= 1 (high / low frame rate), got {self.temporal_factor}")
        require(self.sigma_logit_std > 0, "stage.sigma_logit_std", f"must be > 0, got {self.sigma_logit_std}")
        return self

    def check_train_config(self, train_cfg) -> None:
        require(bool(train_cfg.lora.rank), "lora.rank",
                f"stage.kind=refine ({self.name}) trains a LoRA on the base model: set lora.rank > 0 "
                f"(stage=refine_lora sets 128, alpha 64)")
        require(bool(train_cfg.trainer.init_from), "trainer.init_from",
                f"stage.kind=refine ({self.name}) refines a trained base model: set trainer.init_from=<the published "
                f"LongCat-Video folder or an lcv-export output> (a fresh DiT's AdaLN-Zero gates are zero: its "
                f"adapters would get no gradient)")
        k = self.temporal_factor
        for i, b in enumerate(dict(train_cfg.data or {}).get("buckets") or []):
            require((int(b[0]) - 1) % k == 0, f"data.buckets[{i}]",
                    f"{int(b[0])} frames is not 1 + {k}k: the refiner's low frame rate keeps one frame in {k}, "
                    f"first and last included (stage.temporal_factor={k})")


@register_stage("refine", RefineStageConfig)
class RefineStage(Stage):
    def __init__(self, cfg: RefineStageConfig, train_cfg):
        super().__init__(cfg, train_cfg)
        self._decoding_logged = False

    @torch.no_grad()
    def upsampled_latents(self, batch: StageBatch, codec, device) -> torch.Tensor:
        """``z_up``: the latents of the clip degraded and upsampled back (``refine_input_video``), from the
        batch's pixels, or from its latents decoded by ``codec`` when the shards hold latents only."""
        if batch.pixels is not None:
            from data_loaders.decode import video_to_float

            video = video_to_float(batch.pixels.to(device, non_blocking=True))
        else:
            if not self._decoding_logged:
                log.info("stage %s: the shards hold latents only; decoding each batch to pixels for the refiner's "
                         "degraded input (one extra VAE decode and encode per micro-batch)", self.name)
                self._decoding_logged = True
            video = codec.decode(batch.latents)
        up = refine_input_video(video, self.cfg.spatial_factor, self.cfg.temporal_factor)
        return codec.encode(up.clamp_(-1.0, 1.0)).to(batch.latents.dtype)

    def loss(self, model, batch: StageBatch, z_up: torch.Tensor, generator) -> tuple[torch.Tensor, dict]:
        """The refine loss of one micro-batch (MSE over the noisy frames), and scalar metrics."""
        x0, k, c = batch.latents, batch.num_cond, self.cfg
        sigma = sample_refine_sigmas(x0.shape[0], c.t_start, c.sigma_logit_mean, c.sigma_logit_std, generator,
                                     x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
        inputs = make_refine_inputs(x0, z_up, k, sigma, eps, c.t_start)
        v = model(inputs.noisy, inputs.timestep, batch.text, batch.text_mask, num_cond_latents=k)
        loss = flow_matching_loss(v, inputs.target, k)
        degradation = torch.mean((z_up[:, :, k:].float() - x0[:, :, k:].float()) ** 2)
        return loss, {"sigma_mean": sigma.mean().detach(), "degradation_mse": degradation.detach()}

    def step(self, ctx: StepContext) -> dict:
        sums = {"loss": torch.zeros((), device=ctx.device), "sigma_mean": torch.zeros((), device=ctx.device),
                "degradation_mse": torch.zeros((), device=ctx.device)}
        for _ in range(ctx.grad_accum):
            batch = ctx.next_batch()
            z_up = self.upsampled_latents(batch, ctx.codec, ctx.device)
            with ctx.engine.autocast():
                loss, m = self.loss(ctx.model, batch, z_up, ctx.generator)
            ctx.phase("backward")
            ctx.engine.backward(loss / ctx.grad_accum)
            sums["loss"] += loss.detach().float()  # on the device: no host sync per micro-batch
            for key in ("sigma_mean", "degradation_mse"):
                sums[key] += m[key].float()
        metrics = ctx.optimizer_step(sums["loss"] / ctx.grad_accum)
        metrics["train/sigma_mean"] = float(sums["sigma_mean"]) / ctx.grad_accum
        metrics["refine/degradation_mse"] = float(sums["degradation_mse"]) / ctx.grad_accum
        return metrics
