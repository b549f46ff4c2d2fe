"""User-facing errors. Anything raised as a NeuroplexError is shown as one line, no traceback."""


class NeuroplexError(Exception):
    """A problem with user input (config, data file, checkpoint, CLI argument)."""


class ConfigError(NeuroplexError):
    """Invalid configuration: the message names the field, the value and what was expected."""

    def __str__(self) -> str:
        return f"config error: {super().__str__()}"


class DataError(NeuroplexError):
    """Invalid or unreadable dataset: the message names the file and the problem."""

    def __str__(self) -> str:
        return f"data error: {super().__str__()}"


class CheckpointError(NeuroplexError):
    """Missing, corrupted or mismatched checkpoint."""

    def __str__(self) -> str:
        return f"checkpoint error: {super().__str__()}"


class TrainingDiverged(NeuroplexError):
    """The loss became NaN or infinite."""
