"""Model families and the registry; importing this package registers every model."""

from . import mlp, resnet  # noqa: F401  (registers the builders)
from .base import Classifier, FeatureInfo
from .mlp import ResidualMLP
from .registry import UnknownModelError, create_model, is_model, list_models, model_entry
from .resnet import ResNet, cifar_resnet, preact_cifar_resnet

__all__ = [
    "Classifier",
    "FeatureInfo",
    "ResNet",
    "ResidualMLP",
    "UnknownModelError",
    "cifar_resnet",
    "create_model",
    "is_model",
    "list_models",
    "model_entry",
    "preact_cifar_resnet",
]
