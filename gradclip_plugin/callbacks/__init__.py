"""Lightning callbacks: thin layers over :mod:`gradclip_plugin.functional`."""

from gradclip_plugin.callbacks.adaptive import AdaGC, AdaptiveGradientClipping, AutoClip, ZClip
from gradclip_plugin.callbacks.base import ClipStats, GradientClipCallback, Step
from gradclip_plugin.callbacks.clip import ClipByGlobalNorm, ClipByNorm, ClipByValue
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.callbacks.spikes import SkipSpikes

__all__ = ["AdaGC", "AdaptiveGradientClipping", "AutoClip", "ClipByGlobalNorm", "ClipByNorm", "ClipByValue", "ClipStats",
    "GradientClipCallback", "GradientNormMonitor", "SkipSpikes", "Step", "ZClip"]
