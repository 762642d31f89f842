"""Error types that carry a message meant for the user (one line, naming the key or file and the fix)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the constraint."""


class CheckpointError(RuntimeError):
    """A checkpoint or weight file is missing, incomplete or does not match the model."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values (NaN/inf) past what the skip policy allows; names the step."""


def require(ok: bool, key: str, what: str) -> None:
    """Raise ``ConfigError("<key>: <what>")`` unless ``ok``: the one way config checks report."""
    if not ok:
        raise ConfigError(f"{key}: {what}")
