"""Flow matching (training targets, timestep sampling, loss) with LongCat's sign convention; the refiner's inputs (``refine``)."""

from lcv_train.diffusion.flow_matching import (FlowMatchingConfig, TrainingInputs, add_noise, drop_text,
                                               flow_matching_loss, make_training_inputs, null_text, sample_sigmas, shift_for_tokens, shift_sigma,
                                               velocity_target)
from lcv_train.diffusion.refine import (degrade_video, make_refine_inputs, refine_input_video, sample_refine_sigmas,
                                        upsample_video)

__all__ = ["FlowMatchingConfig", "TrainingInputs", "add_noise", "drop_text", "null_text", "flow_matching_loss", "make_training_inputs",
           "sample_sigmas", "shift_for_tokens", "shift_sigma", "velocity_target",
           "degrade_video", "make_refine_inputs", "refine_input_video", "sample_refine_sigmas", "upsample_video"]
