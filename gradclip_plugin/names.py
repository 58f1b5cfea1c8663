"""The names of the metrics and tags the callbacks log, shared with ``gradclip report`` (no torch import).

A clipping callback logs ``<prefix>/<name>``: ``prefix`` is its ``log_prefix`` (``CLIP_PREFIX`` by
default), with ``/opt<i>`` per optimizer when there are several and ``/<Class><k>`` when several
clipping callbacks share a prefix. A monitor logs ``<prefix>/<name>`` under ``MONITOR_PREFIX``.
Non-finite values are not written (a chart cannot draw them); ``NONFINITE_STEPS`` counts them.
"""

CLIP_PREFIX = "grad_clip"
MONITOR_PREFIX = "grad_norm"

# clipping callbacks
NORM = "norm"  #: pre-clip total norm of the last step of the logging interval
NORM_CLIPPED = "norm_clipped"  #: its post-clip norm (not written for a skipped step)
NORM_MAX = "norm_max"  #: the largest pre-clip norm of every step since the last log, logged or not
THRESHOLD = "threshold"  #: the threshold in force at the last step (not written for a skipped step)
CLIP_RATE = "clip_rate"  #: fraction of the finite steps since the last log that clipping changed
SKIPPED_STEPS = "skipped_steps"  #: running count of the steps the rule skipped (``skip_above``, ZClip)
GROUP_NORM = "norm"  #: ``norm/<group>``: a group's pre-clip norm
CLIPPED_TENSORS = "clipped_tensors"  #: AdaGC's count of the tensors it clipped at the last step
Z, SPIKES = "z", "spikes"  #: ZClip's z-score of the last step, and its running count of spikes
RULE = "callback"  #: the TensorBoard text at ``<prefix>/callback``: the clipping callback's class name

# monitors
TOTAL = "total"  #: total norm of the last step of the logging interval
TOTAL_MAX = "total_max"  #: the largest total norm of every step since the last log
WEIGHT, UPDATE_RATIO = "weight", "update_ratio"  #: ``weight/<group>``, ``update_ratio/<group>``

# both
NONFINITE_STEPS = "nonfinite_steps"  #: running count of the steps whose gradients were not finite
