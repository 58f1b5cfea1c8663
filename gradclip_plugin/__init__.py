"""gradclip_plugin: TensorFlow-style gradient clipping and gradient-norm monitoring for PyTorch Lightning."""

from gradclip_plugin.callbacks import (
    AdaptiveGradientClipping,
    AutoClip,
    ClipByGlobalNorm,
    ClipByNorm,
    ClipByValue,
    GradientClipCallback,
    GradientNormMonitor,
    ZClip,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveGradientClipping",
    "AutoClip",
    "ClipByGlobalNorm",
    "ClipByNorm",
    "ClipByValue",
    "GradientClipCallback",
    "GradientNormMonitor",
    "ZClip",
]
