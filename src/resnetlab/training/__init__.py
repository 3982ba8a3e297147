"""Training: configuration, optimisation, the loop, checkpoints and progress."""

from .config import TrainConfig
from .engine import Interrupted, NonFiniteLoss, Trainer, TrainingStopped, TrainResult, train
from .evaluate import EvalResult, evaluate

__all__ = [
    "EvalResult",
    "Interrupted",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingStopped",
    "evaluate",
    "train",
]
