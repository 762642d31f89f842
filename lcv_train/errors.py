"""Error types that carry a message meant for the user (one line, naming the key or file and the fix)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the constraint."""


class CheckpointError(RuntimeError):
    """A checkpoint or weight file is missing, incomplete or does not match the model."""
