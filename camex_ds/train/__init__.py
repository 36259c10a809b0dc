"""Training components: the loop (`run`), crash-safe checkpoints, metrics."""
from ..run_args import TrainArgs
from .checkpoint import CheckpointError
from .guard import NonFiniteError
from .loop import run

__all__ = ["CheckpointError", "NonFiniteError", "TrainArgs", "run"]
