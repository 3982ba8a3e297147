"""resnetlab: build, train and study residual networks."""

from .checkpoint import load_model
from .errors import UserError
from .evaluation import evaluate_checkpoint
from .export import export_model
from .models import (
    Classifier,
    FeatureInfo,
    ResidualMLP,
    ResNet,
    UnknownModelError,
    create_model,
    list_models,
)
from .training import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "FeatureInfo",
    "ResNet",
    "ResidualMLP",
    "TrainConfig",
    "TrainResult",
    "UnknownModelError",
    "UserError",
    "create_model",
    "evaluate_checkpoint",
    "export_model",
    "list_models",
    "load_model",
    "train",
]
