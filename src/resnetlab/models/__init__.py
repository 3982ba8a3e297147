"""Model families and the registry; importing this package registers every model."""

from . import densenet, efficientnet, mlp, mobilenet, resnet  # noqa: F401  (registers the builders)
from .base import Classifier, FeatureInfo
from .densenet import DenseNet
from .efficientnet import EfficientNet
from .mlp import ResidualMLP
from .mobilenet import MobileNetV2
from .registry import UnknownModelError, create_model, is_model, list_models, model_entry
from .resnet import ResNet, cifar_resnet, preact_cifar_resnet

__all__ = [
    "Classifier",
    "DenseNet",
    "EfficientNet",
    "FeatureInfo",
    "MobileNetV2",
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
