"""Training components: the loop (`run`), crash-safe checkpoints, metrics."""
from .checkpoint import CheckpointError
from .loop import DEFAULT_MODEL, NonFiniteError, TrainArgs, run

__all__ = ["CheckpointError", "DEFAULT_MODEL", "NonFiniteError", "TrainArgs", "run"]
