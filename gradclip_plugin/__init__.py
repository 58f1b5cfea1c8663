"""gradclip_plugin: TensorFlow-style gradient clipping and gradient-norm monitoring for PyTorch Lightning.

The callbacks are imported on first use (PEP 562), so that tools that need no Lightning (the
``gradclip report`` command, :mod:`gradclip_plugin.functional`) start without importing it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["AdaGC", "AdaptiveGradientClipping", "AutoClip", "ClipByGlobalNorm", "ClipByNorm", "ClipByValue",
    "GradientClipCallback", "GradientNormMonitor", "SkipSpikes", "ZClip"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("gradclip_plugin.callbacks"), name)
    raise AttributeError(f"module 'gradclip_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
