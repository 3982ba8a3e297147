"""The experiments behind the claims of residual learning, each one command with figures and a report."""

from .degradation import DegradationSettings, run_degradation
from .demo import DemoSettings, run_demo
from .families import FamilySettings, run_families
from .gradients import GradientSettings, run_gradients
from .identity import IdentitySettings, run_identity
from .lesion import LesionSettings, run_lesion

STUDIES = {
    "degradation": (
        DegradationSettings,
        run_degradation,
        "plain vs residual nets at growing depth (figure 6)",
    ),
    "gradients": (GradientSettings, run_gradients, "per-layer gradient norms and shattered gradients"),
    "identity": (IdentitySettings, run_identity, "zero branches, deepening without harm, ||F(x)||/||x||"),
    "lesion": (LesionSettings, run_lesion, "remove blocks from trained ResNets and plain nets (Veit et al.)"),
    "families": (FamilySettings, run_families, "ResNet, MobileNetV2, EfficientNet, DenseNet: accuracy against cost"),
}

__all__ = [
    "STUDIES",
    "DegradationSettings",
    "DemoSettings",
    "FamilySettings",
    "GradientSettings",
    "IdentitySettings",
    "LesionSettings",
    "run_degradation",
    "run_demo",
    "run_families",
    "run_gradients",
    "run_identity",
    "run_lesion",
]
