"""Training: configuration, optimisation, the loop, checkpoints and progress."""

from .config import TrainConfig
from .engine import EvalResult, Interrupted, NonFiniteLoss, TrainingStopped, TrainResult, evaluate, train

__all__ = [
    "EvalResult",
    "Interrupted",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "evaluate",
    "train",
]
