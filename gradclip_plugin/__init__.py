"""gradclip_plugin: TensorFlow-style gradient clipping and gradient-norm monitoring for PyTorch Lightning."""

from gradclip_plugin.callbacks import ClipByGlobalNorm, ClipByNorm, ClipByValue, GradientClipCallback

__version__ = "0.1.0"

__all__ = ["ClipByGlobalNorm", "ClipByNorm", "ClipByValue", "GradientClipCallback"]
