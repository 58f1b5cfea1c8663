"""Adaptive clipping callbacks: AGC (unit-wise, relative to the weights), AutoClip and ZClip (thresholds
that follow the history of the gradient norm).

The arithmetic lives in :mod:`gradclip_plugin.functional.adaptive`. AutoClip and ZClip keep one state
per optimizer, Python numbers updated from the step's norm read to the host (as their reference
implementations do), and save it in checkpoints under their ``state_key``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from gradclip_plugin import names
from gradclip_plugin.callbacks import _lightning as lightning
from gradclip_plugin.callbacks.base import (ClipStats, GradientClipCallback, GroupDepth, NonFinitePolicy, NormType,
    Step, check_number, read_values)
from gradclip_plugin.functional import combine_norms, scale_, tensor_norms
from gradclip_plugin.functional.adaptive import (AutoClipState, ZClipMode, ZClipOption, ZClipState, adagc_update,
    agc_coefficients, autoclip_update, scale_units_, threshold_coefficient, unitwise_norms, zclip_update)
from gradclip_plugin.functional.distributed import has_dtensor
from gradclip_plugin.functional.norms import check_norm_type

__all__ = ["AdaGC", "AdaptiveGradientClipping", "AutoClip", "ZClip"]


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
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

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
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        clip_factor, eps = check_number("clip_factor", clip_factor), check_number("eps", eps)
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.clip_factor, self.eps = clip_factor, eps
        self.norm_type = check_norm_type(norm_type)

    complex_ok = False  # a unit's limit compares magnitudes of weights and gradients: real ones
    scale_invariant = False  # limits relative to the weights: a fused optimizer's scaled gradients are unscaled first

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
        if self._shard_group is not None or has_dtensor(params):
            raise lightning.misconfiguration(
                trainer,
                "AdaptiveGradientClipping does not support sharded (FSDP) gradients: a unit split across "
                "ranks would be measured by its local piece. Use ClipByGlobalNorm, AutoClip or ZClip, which "
                "reduce the norms of sharded gradients across ranks.",
            )

    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        units = unitwise_norms(grads, self.norm_type)
        # the units' total is the gradients' total; per-tensor norms (a second pass) only for the group norms
        return (units if self.group_depth is None else tensor_norms(grads, self.norm_type)), units

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        units = step.extra
        coefs, limits = agc_coefficients(units, unitwise_norms(params, self.norm_type), self.clip_factor, self.eps)
        scale_units_(grads, coefs)
        p = self.norm_type
        return ClipStats(step.norm, combine_norms(torch.minimum(units, limits), p), combine_norms(limits, p), (coefs < 1).any())


class _HistoryClip(GradientClipCallback):
    """A threshold from the history of the global 2-norm: one state per optimizer, checkpointed.

    The state of optimizer ``i`` is a ``NamedTuple`` of Python numbers (``state_type``), updated by a
    pure function of the step's norm (read to the host: ``reads_norm``). Under ``nonfinite="zero"``
    the re-measured norm of the zeroed gradients is clipped against but kept out of the statistics,
    as the non-finite norm itself would be.
    """

    reads_norm = True
    per_step_state = True
    state_type: type[NamedTuple]
    _per_optimizer = ("_tallies", "_states")

    def _reset(self) -> None:
        super()._reset()
        self._states: dict[int, Any] = {}

    def _sample(self, step: Step) -> float:
        """The norm the statistics take: the one read, or NaN (not recorded) after ``nonfinite="zero"``."""
        return step.host if step.sample else math.nan

    def _clip_to(self, threshold: float, grads: list[Tensor], step: Step) -> ClipStats:
        """Scale ``grads`` so that their global norm ``step.host`` is at most ``threshold``."""
        coef = threshold_coefficient(threshold, step.host)
        if coef < 1.0:
            scale_(grads, coef)
        return ClipStats(step.host, min(step.host, threshold), threshold, coef < 1.0)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            lightning.rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds no state for `{self.state_key}`; its statistics "
                "start afresh."
            )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "states": {i: s._asdict() for i, s in self._states.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for i, saved in state_dict.get("states", {}).items():
            try:
                state = self.state_type(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in saved.items()})
                if not self._fits(state):
                    raise ValueError(state)
            except (TypeError, ValueError):
                lightning.rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint's state for optimizer {i} does not fit a "
                    f"{self.state_type.__name__} (fields {sorted(saved) if isinstance(saved, dict) else saved!r}); "
                    "its statistics start afresh."
                )
                continue
            self._states[int(i)] = state

    def _fits(self, state: Any) -> bool:
        """Whether a restored state is one this rule can continue from."""
        return True


class AutoClip(_HistoryClip):
    """AutoClip: clip the global norm to a percentile of the norms seen so far.

    Each step the pre-clip global L2 norm is appended to the history, then all gradients are
    scaled so that their global norm is at most the ``percentile``-th percentile (linear
    interpolation) of the history, this step included. ``history_size`` keeps only the most recent
    norms; ``None`` keeps all of them (the paper's choice).

    Non-finite norms never enter the history: the step is handled by ``nonfinite``, and under
    ``"ignore"`` or a loss scaler the history simply skips it. The history is saved in checkpoints:
    a resumed run clips exactly as the uninterrupted run would. As in the reference, the history is
    Python floats, from the step's norm read to the host once per step.

    Args:
        percentile: in [0, 100]; the paper finds 10 works across tasks.
        history_size: number of most recent norms kept, or ``None`` for all.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

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

    state_type = AutoClipState

    def __init__(
        self,
        percentile: float = 10.0,
        history_size: Optional[int] = None,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        percentile = check_number("percentile", percentile, valid=lambda v: 0 <= v <= 100, what="a number in [0, 100] (10 in the paper)")
        history_size = check_number("history_size", history_size, allow_none=True, integer=True, what="a positive integer (keep every norm if None)")
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.percentile = percentile
        self.history_size = history_size

    def _fits(self, state: AutoClipState) -> bool:
        values = [*state.history, *state.ranked]
        return all(isinstance(v, float) and math.isfinite(v) for v in values) and sorted(state.history) == list(state.ranked)

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        state = self._states.get(step.idx, AutoClipState())
        state, threshold = autoclip_update(state, self._sample(step), self.percentile, self.history_size)
        self._states[step.idx] = state
        return self._clip_to(threshold, grads, step)


class ZClip(_HistoryClip):
    """ZClip: detect gradient-norm spikes by their z-score against an EMA and clip them adaptively.

    The reference algorithm (``bluorion-com/ZClip``) exactly: the first ``warmup_steps`` steps
    only collect their norms (clipped to ``max_norm`` if not ``None``); then the mean and
    population variance of those norms start an exponential moving average. Each later step has
    ``z = (g - mean) / (std + eps)``; in ``"zscore"`` mode a norm with ``z > z_thresh`` is clipped
    to ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``clip_option="adaptive_scaling"``)
    or to ``mean`` (``"mean"``); in ``"percentile"`` mode any norm above ``mean + z_thresh * std``
    is clipped to it. The threshold in force is never above ``max_norm``. The EMA is updated with
    the clipped value on a spike (skipped if ``skip_update_on_spike``) and with ``g`` otherwise.

    Beyond the reference: non-finite norms never enter the statistics; the state is saved in
    checkpoints; and ``skip_step_z_thresh`` skips the optimizer step entirely when ``z`` exceeds it
    (as ``nonfinite="skip"`` does). As in the reference, the statistics are Python floats updated
    from the step's norm, read to the host once per step.

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
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

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

    state_type = ZClipState

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
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        alpha = check_number("alpha", alpha, valid=lambda v: 0 < v < 1, what="a number in (0, 1) (0.97 in the paper)")
        z_thresh, eps, clip_factor = (check_number(n, v) for n, v in (("z_thresh", z_thresh), ("eps", eps), ("clip_factor", clip_factor)))
        max_norm = check_number("max_norm", max_norm, allow_none=True)
        warmup_steps = check_number("warmup_steps", warmup_steps, integer=True, what="a positive integer")
        zclip_update(ZClipState(), math.nan, mode=mode, clip_option=clip_option)  # validates both
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"`skip_update_on_spike` must be True or False, got {skip_update_on_spike!r}")
        skip_step_z_thresh = check_number("skip_step_z_thresh", skip_step_z_thresh, allow_none=True, valid=lambda v: v >= z_thresh,
                                          what=f"at least `z_thresh` ({z_thresh}): it marks the severe spikes among those clipped")  # fmt: skip
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.alpha, self.z_thresh, self.max_norm, self.eps, self.warmup_steps = alpha, z_thresh, max_norm, eps, warmup_steps
        self.mode, self.clip_option, self.clip_factor = mode, clip_option, clip_factor
        self.skip_update_on_spike, self.skip_step_z_thresh = skip_update_on_spike, skip_step_z_thresh

    @property
    def _skips_steps(self) -> bool:
        return self.skip_step_z_thresh is not None

    def _fits(self, state: ZClipState) -> bool:
        return (state.mean is None) == (state.var is None) and all(isinstance(v, float) for v in state.buffer)

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        state, threshold, z, spike = zclip_update(
            self._states.get(step.idx, ZClipState()), self._sample(step), alpha=self.alpha, z_thresh=self.z_thresh,
            max_norm=self.max_norm, eps=self.eps, warmup_steps=self.warmup_steps, mode=self.mode, clip_option=self.clip_option,
            clip_factor=self.clip_factor, skip_update_on_spike=self.skip_update_on_spike)  # fmt: skip
        self._states[step.idx] = state
        extra = {names.Z: z, names.SPIKES: state.spikes}
        if self.skip_step_z_thresh is not None and spike and z > self.skip_step_z_thresh:  # skipped: not scaled
            return ClipStats(step.host, math.nan, math.nan, False, extra, skip=True)
        return self._clip_to(threshold, grads, step)._replace(extra=extra)


class AdaGC(GradientClipCallback):
    """AdaGC: clip each tensor's gradient relative to a moving average of its own past clipped norms.

    For the first ``warmup_steps`` optimizer steps the gradients are clipped globally to ``lambda_abs``
    (all scaled by ``min(1, lambda_abs / ||g||)``) and each tensor's threshold ``gamma_i`` is the smallest
    of its clipped norms. Then each tensor ``g_i`` is clipped on its own to ``lambda_rel * gamma_i``, and
    ``gamma_i = beta * gamma_i + (1 - beta) * ||g_i clipped||``. It works with any optimizer, reads
    nothing to the host, and measures sharded (FSDP, DTensor) tensors by their full norm. ``gamma`` is
    saved in checkpoints by parameter name; a non-finite step or one skipped on the device leaves it
    as it was, and so do the re-measured norms of ``nonfinite="zero"``. The steps are counted per
    optimizer, a step skipped on the device included (one skipped on the host is not).

    Differences from pytorch-optimizer's ``AdaGC`` (Adam with this clipping built in): no epsilon (it
    adds ``eps`` to the global norm and floors ``gamma`` and the tensor norms at ``eps``, its Adam
    ``eps``); and it counts from 1 and clips globally while ``step < warmup_steps``, so our
    ``warmup_steps=w`` is its ``warmup_steps=w + 1``. As there, a tensor with no gradient during
    warm-up is clipped globally until it has a ``gamma``; one whose gradient was 0 at a warm-up step
    has ``gamma = 0``, and is zeroed from then on (the paper's rule; pytorch-optimizer's ``eps`` limits
    it to ``1.05e-8``).

    Logged besides the base metrics: ``clipped_tensors``, how many tensors were clipped at the step;
    ``threshold`` is ``lambda_abs`` during warm-up, then the global norm of the limits ``lambda_rel * gamma_i``.

    Args:
        lambda_abs: the global threshold of the warm-up.
        lambda_rel: each tensor's limit relative to its ``gamma`` (1.05 in the paper).
        beta: the moving average's smoothing factor, in [0, 1) (0.98 in the paper).
        warmup_steps: optimizer steps clipped globally (100 in the paper), a positive integer.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.AdaGC
              init_args:
                lambda_abs: 1.0
                lambda_rel: 1.05
                beta: 0.98
                warmup_steps: 100

    References:
        Wang et al. 2025, "AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient Clipping",
        arXiv 2502.11034; pytorch-optimizer ``AdaGC``.
    """

    def __init__(
        self,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        lambda_abs, lambda_rel = check_number("lambda_abs", lambda_abs), check_number("lambda_rel", lambda_rel)
        beta = check_number("beta", beta, valid=lambda v: 0 <= v < 1, what="a number in [0, 1) (0.98 in the paper)")
        warmup_steps = check_number("warmup_steps", warmup_steps, integer=True, what="a positive integer (100 in the paper)")
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.lambda_abs, self.lambda_rel, self.beta, self.warmup_steps = lambda_abs, lambda_rel, beta, warmup_steps

    _per_optimizer = ("_tallies", "_steps", "_gamma")
    per_step_state = True

    def _reset(self) -> None:
        super()._reset()
        self._gamma: dict[int, dict[str, Tensor]] = {}  # optimizer index -> parameter name -> its gamma, 0-dim
        self._steps: dict[int, int] = {}  # optimizer index -> steps seen
        self._name_of: dict[int, str] = {}  # id(param) -> name, from the plans

    def _names(self, params: list[Tensor]) -> list[str]:
        """The names of ``params`` in their plans (one the module does not name: by its position)."""
        if any(id(p) not in self._name_of for p in params):
            self._name_of = {id(p): n for plan in self._plans.values() for p, n in zip(plan.params, plan.names)}
        return [n if (n := self._name_of.get(id(p), "?")) != "?" else f"?{i}" for i, p in enumerate(params)]

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        keys, unset = self._names(params), step.norms.new_full((), math.inf)
        ours = self._gamma.setdefault(step.idx, {})  # a parameter shared by two optimizers has a gamma in each
        gamma = torch.stack([ours.get(k, unset).to(step.norms) for k in keys])
        seen = self._steps[step.idx] = self._steps.get(step.idx, 0) + 1
        warmup = seen <= self.warmup_steps
        gamma, coefs, limits = adagc_update(gamma, step.norms, warmup=warmup, lambda_abs=self.lambda_abs,
                                            lambda_rel=self.lambda_rel, beta=self.beta, skip=step.skip)  # fmt: skip
        if step.sample:  # not the re-measured norms of `nonfinite="zero"`
            ours.update(zip(keys, gamma.unbind()))
        scale_(grads, coefs)
        clipped = coefs < 1
        threshold = self.lambda_abs if warmup else combine_norms(limits)
        return ClipStats(step.norm, combine_norms(step.norms * coefs), threshold, clipped.any(), {names.CLIPPED_TENSORS: clipped.sum()})

    def state_dict(self) -> dict[str, Any]:
        keys = [(i, k) for i, ours in self._gamma.items() for k in ours]
        gamma: dict[int, dict[str, float]] = {i: {} for i in self._gamma}
        for (i, k), v in zip(keys, read_values([self._gamma[i][k] for i, k in keys])):  # one device-to-host copy
            gamma[i][k] = v
        return {**super().state_dict(), "gamma": gamma, "steps": dict(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        try:
            gamma = {int(i): {str(k): torch.tensor(float(v)) for k, v in ours.items()} for i, ours in state_dict.get("gamma", {}).items()}
            self._steps = {int(i): int(s) for i, s in state_dict.get("steps", {}).items()}
        except (TypeError, ValueError, AttributeError):
            lightning.rank_zero_warn("AdaGC: the checkpoint's `gamma` or step counts do not fit; they start afresh.")
            return
        self._gamma = gamma
