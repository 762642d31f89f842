"""Sampling: schedules, step rules, guidance, the condition cache, the long-video loop and the refiner
(``sampler``, ``pipeline``), one loader for every checkpoint source (``load``) and ``lcv-sample`` (``cli``)."""

from lcv_train.sampling.guidance import guided_velocity, uses_cfg
from lcv_train.sampling.sampler import Denoiser, SamplerConfig, denoise, sample
from lcv_train.sampling.schedules import (base_sigmas, distill_sigmas, enhance_hf_sigmas, refine_sigmas,
                                          sigma_schedule)
from lcv_train.sampling.steps import EulerStep, SDEStep, build_step_rule

__all__ = ["Denoiser", "EulerStep", "SDEStep", "SamplerConfig", "base_sigmas", "build_step_rule", "denoise",
           "distill_sigmas", "enhance_hf_sigmas", "guided_velocity", "refine_sigmas", "sample", "sigma_schedule",
           "uses_cfg"]
