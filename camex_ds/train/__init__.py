"""Training components: the loop (`run`), crash-safe checkpoints, metrics."""
from ..config import TrainArgs
from .checkpoint import CheckpointError
from .loop import NonFiniteError, run

__all__ = ["CheckpointError", "NonFiniteError", "TrainArgs", "run"]
