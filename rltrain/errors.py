"""Errors that end a run with one line naming what is wrong. They live below every other module, so that any of them
(config schemas, algorithms, datasets) can raise them without importing the others."""


class ConfigError(ValueError):
    """A config value that type-checks but makes no sense; the message names the key."""


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message names the path, the split and the config key."""


class DatasetRowError(DatasetError):
    """A row that cannot be trained on; the message names the prompt set (path and split), the row and the column."""


class TrainingDiverged(RuntimeError):
    """The policy's loss, gradient, weights or next-token probabilities stopped being finite; the message says where
    and what to change before resuming."""
