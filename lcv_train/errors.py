"""Error types that carry a message meant for the user (one line, naming the key or file and the fix)."""

from conf.parsing import ConfigError, require  # the config parser's, so every layer raises the same class


class CheckpointError(RuntimeError):
    """A checkpoint or weight file is missing, incomplete or does not match the model."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values (NaN/inf) past what the skip policy allows; names the step."""


__all__ = ["CheckpointError", "ConfigError", "TrainingDiverged", "require"]
