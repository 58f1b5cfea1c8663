"""Pure tensor functions (torch only): norms, TensorFlow-named clipping ops, the gradient pipeline."""

from gradclip_plugin.functional.adaptive import (AutoClipState, ZClipState, adagc_update, adaptive_clip_grad_, agc_coefficients,
    autoclip_update, scale_units_, SpikeWindow, spike_update, threshold_coefficient, unit_counts, unitwise_norm, unitwise_norms, zclip_update)
from gradclip_plugin.functional.clip import (clip_by_global_norm, clip_by_global_norm_, clip_by_norm, clip_by_norm_,
    clip_by_value, clip_by_value_, clip_coefficient, scale_)
from gradclip_plugin.functional.gradients import apply_gradients, compute_gradients
from gradclip_plugin.functional.norms import combine_norms, global_norm, subset_norms, tensor_norms

__all__ = ["AutoClipState", "ZClipState", "adagc_update", "adaptive_clip_grad_", "agc_coefficients", "autoclip_update",
    "scale_units_", "SpikeWindow", "spike_update", "threshold_coefficient", "unit_counts", "unitwise_norm", "unitwise_norms", "zclip_update",
    "apply_gradients", "clip_by_global_norm", "clip_by_global_norm_", "clip_by_norm", "clip_by_norm_",
    "clip_by_value", "clip_by_value_", "clip_coefficient", "combine_norms", "compute_gradients", "global_norm",
    "scale_", "subset_norms", "tensor_norms"]
