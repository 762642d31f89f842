"""Samplers: Euler ODE with CFG for T2V / I2V / VC."""

from lcv_train.sampling.sampler import SamplerConfig, guided_velocity, sample, sigma_schedule

__all__ = ["SamplerConfig", "guided_velocity", "sample", "sigma_schedule"]
