"""Adaptive clipping callbacks: AGC (unit-wise, relative to the weights), AutoClip and ZClip (thresholds
that follow the history of the gradient norm).

The arithmetic lives in :mod:`gradclip_plugin.functional.adaptive`; these classes hold the per-optimizer
state, save it in checkpoints and log it. Nothing here reads a value back to the host on a step
that does not log, except ZClip's optional ``skip_step_z_thresh`` (one boolean per step, only when set).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from gradclip_plugin.callbacks.base import (
    ClipStats,
    GradientClipCallback,
    NonFinitePolicy,
    NormType,
    check_positive,
)
from gradclip_plugin.functional import combine_norms, scale_
from gradclip_plugin.functional.norms import check_norm_type
from gradclip_plugin.functional.adaptive import (
    AutoClipState,
    Value,
    ZClipMode,
    ZClipOption,
    ZClipState,
    agc_coefficients,
    autoclip_init,
    autoclip_update,
    scale_units_,
    threshold_coefficient,
    unitwise_norms,
    zclip_init,
    zclip_update,
)

__all__ = ["AdaptiveGradientClipping", "AutoClip", "ZClip"]


class AdaptiveGradientClipping(GradientClipCallback):
    """Unit-wise adaptive gradient clipping (AGC): each unit's gradient is kept within ``clip_factor`` of its weight.

    For each parameter ``W`` and its gradient ``G``, a unit is a slice along the first (output)
    dimension (a row of a ``Linear`` weight, an output channel of a ``ConvNd`` kernel); tensors of
    one dimension or less are one unit. Where ``||G_u|| > clip_factor * max(||W_u||, eps)``, ``G_u`` is
    scaled to that limit. A zero-initialised bias therefore gets limit ``clip_factor * eps``, not 0.

    The paper does not clip the final classifier layer: exclude it, e.g. ``exclude=["head.*"]``.

    Logged: ``norm`` and ``norm_clipped`` are the global norms of the gradients before and after;
    ``threshold`` is the global norm of the unit limits (the largest gradient AGC lets through
    unchanged); ``clip_rate`` counts the steps at which any unit was rescaled.

    Args:
        clip_factor: the allowed ratio ``||G_u|| / ||W_u||`` (the paper's lambda; 0.01 for batch
            size 4096 in the paper, larger for smaller batches).
        eps: floor on the weight norm, a positive number.
        norm_type: order of the unit-wise norms (the paper uses 2).
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``log_prefix`` (see :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.AdaptiveGradientClipping
              init_args:
                clip_factor: 0.01
                eps: 0.001
                exclude: ["head.*"]

    References:
        Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization"
        (NFNets), arXiv 2102.06171; timm ``timm/utils/agc.py``.
    """

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        norm_type: NormType = 2.0,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        log_prefix: str = "grad_clip",
    ) -> None:
        check_positive("clip_factor", clip_factor)
        check_positive("eps", eps)
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, log_prefix=log_prefix)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.norm_type = check_norm_type(norm_type)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._shard_group is not None:
            raise MisconfigurationException(
                "AdaptiveGradientClipping does not support FSDP's flat-sharded gradients: a unit split across "
                "ranks would be measured by its local piece. Use ClipByGlobalNorm, AutoClip or ZClip, which "
                "reduce the norms of sharded gradients across ranks."
            )

    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        unit_norms = unitwise_norms(grads, self.norm_type)
        return combine_norms(unit_norms, self.norm_type), unit_norms

    def clip_(self, grads: list[Tensor], params: list[Tensor], measured: tuple[Tensor, Any]) -> ClipStats:
        norm, grad_norms = measured
        coefs, limits = agc_coefficients(grad_norms, unitwise_norms(params, self.norm_type), self.clip_factor, self.eps)
        scale_units_(grads, coefs)
        return ClipStats(
            norm,
            combine_norms(grad_norms * coefs, self.norm_type),
            combine_norms(limits, self.norm_type),
            (coefs < 1).any(),
        )


class _StatefulClipCallback(GradientClipCallback):
    """Per-optimizer adaptive state: created on first use where the step's norm is, saved in checkpoints.

    The state of optimizer ``i`` is a ``NamedTuple`` (``_state_type``): Python numbers on the host when
    the base class read the step's norm (``step.norm``, the ``skip``/``error``/``zero`` policies), else
    tensors on the gradients' device. ``state_dict`` saves it (tensors on the CPU), ``load_state_dict``
    restores it, and on first use it moves to where the norm is, if it is not there already. The
    checkpoint entry is keyed by ``state_key`` (class name and init arguments), so two instances in
    one Trainer keep separate state.

    The statistics take a step's norm only if the first measured norm was finite (``step.finite``,
    a host bool where the base class read it): under ``nonfinite="zero"`` the base class zeroes the
    bad entries and measures again, and that finite norm is clipped against but is not the
    gradient's true size, so it stays out of the history as the non-finite norm itself would.
    """

    _state_type: type[NamedTuple]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._states: dict[int, Any] = {}

    def _norm(self, measured: tuple[Tensor, Any]) -> Value:
        """The step's norm: the Python float the base class read (the state is then kept on the host,
        in float64, with no kernel), else the 0-dim tensor (the state stays on its device)."""
        return self.read_norm if self.read_norm is not None else measured[0]

    def _state(self, norm: Value) -> Any:
        """This optimizer's state, where ``norm`` is: on the host for a float, else on its device.

        A state moves only when that changes: restored from a checkpoint (on the CPU), or resumed
        under a loss scaler (which reads nothing) after a run without one.
        """
        state = self._states.get(self.step.idx)
        if state is None:
            state = self._init_state(norm)
        elif isinstance(norm, float):
            state = state if state.on_host else state.to_host()
        elif state.on_host or state[0].device != norm.device:
            state = state.to_device(norm.device, norm.dtype)
        self._states[self.step.idx] = state
        return state

    def _clip_to(self, threshold: Value, grads: list[Tensor], norm: Value) -> ClipStats:
        """Scale ``grads`` so that their global norm ``norm`` is at most ``threshold``; a coefficient the
        host knows to be 1 scales nothing."""
        coef = threshold_coefficient(threshold, norm)
        if not isinstance(coef, float) or coef < 1.0:
            scale_(grads, coef)
        return ClipStats(norm, norm * coef, threshold, coef < 1)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["state"] = {
            i: {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in s._asdict().items()}
            for i, s in self._states.items()
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        fields = set(self._state_type._fields)
        for i, saved in state_dict.get("state", {}).items():
            if set(saved) != fields:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint's state for optimizer {i} has fields {sorted(saved)}, "
                    f"expected {sorted(fields)}; it was not written by this version of {type(self).__name__}"
                )
            # the count back on the host (a CPU tensor in older checkpoints): updates whose finiteness the
            # host knows keep it there and branch on it instead of selecting on the device
            state = self._state_type(**{**saved, "count": int(saved["count"])})
            self._check_loaded(state)
            self._states[int(i)] = state

    def _check_loaded(self, state: Any) -> None:
        """Raise ``ValueError`` if a restored state does not fit this instance's arguments."""


class AutoClip(_StatefulClipCallback):
    """AutoClip: clip the global norm to a percentile of the norms seen so far.

    Each step the pre-clip global L2 norm is appended to the history, then all gradients are
    scaled so that their global norm is at most the ``percentile``-th percentile (linear
    interpolation) of the history, this step included. ``history_size`` keeps only the most recent
    norms; ``None`` keeps all of them (the paper's choice).

    Non-finite norms never enter the history: the step is handled by ``nonfinite``, and under
    ``"ignore"`` or a loss scaler the history simply skips it. The history is saved in checkpoints:
    a resumed run clips exactly as the uninterrupted run would.

    Args:
        percentile: in [0, 100]; the paper finds 10 works across tasks.
        history_size: number of most recent norms kept, or ``None`` for all.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``log_prefix`` (see :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.AutoClip
              init_args:
                percentile: 10.0
                history_size: null

    References:
        Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks", IEEE MLSP; github.com/pseeth/autoclip.
    """

    _state_type = AutoClipState

    def __init__(
        self,
        percentile: float = 10.0,
        history_size: Optional[int] = None,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        log_prefix: str = "grad_clip",
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise ValueError(f"`percentile` must be a number in [0, 100] (10 in the paper), got {percentile!r}")
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(
                f"`history_size` must be a positive integer or None (keep every norm), got {history_size!r}"
            )
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, log_prefix=log_prefix)
        self.percentile = float(percentile)
        self.history_size = history_size

    def _init_state(self, norm: Value) -> AutoClipState:
        if isinstance(norm, float):
            return autoclip_init(self.history_size, on_host=True)
        return autoclip_init(self.history_size, device=norm.device, dtype=norm.dtype)

    def _check_loaded(self, state: AutoClipState) -> None:
        if self.history_size is not None and len(state.history) != self.history_size:
            raise ValueError(
                f"AutoClip: the checkpoint holds a history of {len(state.history)} norms but "
                f"`history_size={self.history_size}`; resume with the `history_size` the run was started with"
            )

    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        return combine_norms(self.tensor_norms(grads, 2.0), 2.0), None

    def clip_(self, grads: list[Tensor], params: list[Tensor], measured: tuple[Tensor, Any]) -> ClipStats:
        norm = self._norm(measured)
        state, threshold = autoclip_update(
            self._state(norm), norm, self.percentile, self.history_size, finite=self.step.finite
        )
        self._states[self.step.idx] = state
        return self._clip_to(threshold, grads, norm)


class ZClip(_StatefulClipCallback):
    """ZClip: detect gradient-norm spikes by their z-score against an EMA and clip them adaptively.

    The reference algorithm (``bluorion-com/ZClip``) exactly: the first ``warmup_steps`` steps
    only collect their norms (clipped to ``max_norm`` if not ``None``); then the mean and
    population variance of those norms start an exponential moving average. Each later step has
    ``z = (g - mean) / (std + eps)``; in ``"zscore"`` mode a norm with ``z > z_thresh`` is clipped
    to ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``clip_option="adaptive_scaling"``)
    or to ``mean`` (``"mean"``); in ``"percentile"`` mode any norm above ``mean + z_thresh * std``
    is clipped to it. The threshold in force is never above ``max_norm``. The EMA is updated with
    the clipped value on a spike (skipped if ``skip_update_on_spike``) and with ``g`` otherwise.

    Beyond the reference: non-finite norms never enter the statistics; the state lives on the
    gradients' device (no host read per step) and is saved in checkpoints; and
    ``skip_step_z_thresh`` skips the optimizer step entirely when ``z`` exceeds it (the gradients
    are dropped as by ``nonfinite="skip"``). That option reads one boolean per step to the host, so
    it is off by default.

    Logged besides the base metrics: ``z`` (this step's z-score, 0 during warm-up), ``spikes``
    (spikes so far) and, with ``skip_step_z_thresh``, ``skipped_steps``.

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: z-score above which a norm is a spike (``"zscore"``), or the multiple of the std
            above the mean that bounds the norm (``"percentile"``).
        max_norm: an upper bound on the threshold at every step (warm-up included), or ``None``.
        eps: added to the std in the z-score.
        warmup_steps: finite norms collected before the EMA starts.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``"zscore"`` mode only).
        clip_factor: multiplies the adaptive threshold (``"adaptive_scaling"`` only); 0.5-0.9 clips harder.
        skip_update_on_spike: keep spikes out of the EMA.
        skip_step_z_thresh: skip the optimizer step when ``z`` exceeds this (at least ``z_thresh``);
            ``None`` (default) never skips.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``log_prefix`` (see :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.ZClip
              init_args:
                alpha: 0.97
                z_thresh: 2.5
                max_norm: 1.0
                warmup_steps: 25
                mode: zscore
                clip_option: adaptive_scaling

    References:
        Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507;
        github.com/bluorion-com/ZClip.
    """

    _state_type = ZClipState
    metric_names = GradientClipCallback.metric_names + ("z", "spikes", "skipped_steps")

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_norm: Optional[float] = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: ZClipMode = "zscore",
        clip_option: ZClipOption = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        skip_step_z_thresh: Optional[float] = None,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        log_prefix: str = "grad_clip",
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be a number in (0, 1) (0.97 in the paper), got {alpha!r}")
        check_positive("z_thresh", z_thresh)
        check_positive("max_norm", max_norm, allow_none=True)
        check_positive("eps", eps)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be a positive integer, got {warmup_steps!r}")
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"`mode` must be 'zscore' or 'percentile', got {mode!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"`clip_option` must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        check_positive("clip_factor", clip_factor)
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"`skip_update_on_spike` must be True or False, got {skip_update_on_spike!r}")
        check_positive("skip_step_z_thresh", skip_step_z_thresh, allow_none=True)
        if skip_step_z_thresh is not None and skip_step_z_thresh < z_thresh:
            raise ValueError(
                f"`skip_step_z_thresh` must be at least `z_thresh` ({z_thresh}): it marks the severe spikes "
                f"among those clipped, got {skip_step_z_thresh!r}"
            )
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, log_prefix=log_prefix)
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option
        self.clip_factor = float(clip_factor)
        self.skip_update_on_spike = skip_update_on_spike
        self.skip_step_z_thresh = None if skip_step_z_thresh is None else float(skip_step_z_thresh)
        self._z: dict[int, Value] = {}
        self._skipped: dict[int, int] = {}

    def _init_state(self, norm: Value) -> ZClipState:
        if isinstance(norm, float):
            return zclip_init(self.warmup_steps, on_host=True)
        return zclip_init(self.warmup_steps, device=norm.device, dtype=norm.dtype)

    def _check_loaded(self, state: ZClipState) -> None:
        if len(state.buffer) != self.warmup_steps:
            raise ValueError(
                f"ZClip: the checkpoint holds a warm-up buffer of {len(state.buffer)} norms but "
                f"`warmup_steps={self.warmup_steps}`; resume with the `warmup_steps` the run was started with"
            )

    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        return combine_norms(self.tensor_norms(grads, 2.0), 2.0), None

    def clip_(self, grads: list[Tensor], params: list[Tensor], measured: tuple[Tensor, Any]) -> ClipStats:
        norm = self._norm(measured)
        state, threshold, z, spike = zclip_update(
            self._state(norm),
            norm,
            alpha=self.alpha,
            z_thresh=self.z_thresh,
            max_norm=self.max_norm,
            eps=self.eps,
            mode=self.mode,
            clip_option=self.clip_option,
            clip_factor=self.clip_factor,
            skip_update_on_spike=self.skip_update_on_spike,
            finite=self.step.finite,
        )
        self._states[self.step.idx] = state
        self._z[self.step.idx] = z
        stats = self._clip_to(threshold, grads, norm)
        if self.skip_step_z_thresh is not None:
            # a host read per step where the state is on the device (nonfinite="ignore", a loss scaler)
            if bool(spike & (z > self.skip_step_z_thresh)):
                self._skipped[self.step.idx] = self._skipped.get(self.step.idx, 0) + 1
                self.skip_step(self.step.optimizer)
        return stats

    def extra_metrics(self) -> dict[str, Value]:
        state = self._states.get(self.step.idx)
        if state is None:
            return {}
        out = {"z": self._z.get(self.step.idx, 0.0), "spikes": state.spikes}
        if self.skip_step_z_thresh is not None:
            out["skipped_steps"] = self._skipped.get(self.step.idx, 0)
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["skipped_steps"] = dict(self._skipped)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._skipped = {int(i): int(n) for i, n in state_dict.get("skipped_steps", {}).items()}
