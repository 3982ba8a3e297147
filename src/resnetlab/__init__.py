"""resnetlab: build, train and study residual networks."""

from .models import (
    Classifier,
    FeatureInfo,
    ResidualMLP,
    ResNet,
    UnknownModelError,
    create_model,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "FeatureInfo",
    "ResNet",
    "ResidualMLP",
    "UnknownModelError",
    "create_model",
    "list_models",
]
