"""The errors a command reports in one line, without a traceback (no torch needed to catch them)."""


class ConfigError(ValueError):
    """A config that cannot be run, with a message that says how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""
