"""The three fixed-threshold rules: by value, by per-tensor norm, by global norm."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gradclip_plugin.callbacks.base import (ClipStats, check_number, GradientClipCallback, GroupDepth,
    NonFinitePolicy, NormType, Step)
from gradclip_plugin.functional import clip_by_value_, clip_coefficient, combine_norms, scale_
from gradclip_plugin.functional.norms import check_norm_type

__all__ = ["ClipByGlobalNorm", "ClipByNorm", "ClipByValue"]


class ClipByValue(GradientClipCallback):
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` before each optimizer step.

    The logged ``norm`` is the inf-norm (largest ``|g|``), the quantity this rule bounds, so that
    ``norm``, ``norm_clipped`` and ``threshold`` share one scale; it is measured in the same pass
    that decides whether clipping changed anything.

    Args:
        clip_value: the bound, a positive finite number.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.ClipByValue
              init_args:
                clip_value: 0.5

    References:
        Mikolov 2012 (thesis); Pascanu et al. 2013; ``tf.clip_by_value``, ``torch.nn.utils.clip_grad_value_``.
    """

    norm_type = float("inf")
    scale_invariant = False  # the bound is on the values: a fused optimizer's scaled gradients are unscaled first
    complex_ok = False  # as torch's `clip_grad_value_`

    def __init__(
        self,
        clip_value: float,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        self.clip_value = check_number("clip_value", clip_value)
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        unclipped = self._unclipped(step, self.clip_value)  # every entry within bounds: no clamping pass
        if unclipped is not None:
            return unclipped
        # where the step may be skipped on the device, an infinite bound there leaves the gradients as they are
        clip_by_value_(grads, self.clip_value if step.skip is None else torch.where(step.skip, math.inf, self.clip_value))
        return ClipStats(step.norm, step.norm.clamp(max=self.clip_value), self.clip_value, step.norm > self.clip_value)


class _MaxNormCallback(GradientClipCallback):
    """A fixed threshold ``max_norm`` on a ``norm_type``-norm: the shared signature (YAML schema)."""

    def __init__(
        self,
        max_norm: float,
        norm_type: NormType = 2.0,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        skip_above: Optional[float] = None,
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        max_norm = check_number("max_norm", max_norm)
        skip_above = check_number("skip_above", skip_above, allow_none=True)
        if skip_above is not None and not skip_above > max_norm:
            raise ValueError(f"`skip_above` must be above `max_norm` ({max_norm}): steps above it are skipped, those between "
                             f"are clipped; got {skip_above!r}")
        super().__init__(include=include, exclude=exclude, nonfinite=nonfinite, max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.max_norm, self.skip_above = max_norm, skip_above
        self.norm_type = check_norm_type(norm_type)


class ClipByNorm(_MaxNormCallback):
    """Clip each gradient tensor to norm ``max_norm`` on its own: ``g *= min(1, max_norm / ||g||)``.

    The logged ``norm`` is the total norm of all selected gradients; ``clip_rate`` counts the
    steps at which at least one tensor was rescaled.

    Args:
        max_norm: the per-tensor threshold, a positive finite number.
        norm_type: order of the norm: any positive number, or ``inf``.
        skip_above: skip the optimizer step (as ``nonfinite="skip"`` does) when the total pre-clip
            norm exceeds this, a loss spike too large to clip; counted in ``skipped_steps``. Above
            ``max_norm``; ``None`` (default) never skips.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.ClipByNorm
              init_args:
                max_norm: 1.0
                norm_type: 2.0

    References:
        ``tf.clip_by_norm`` applied per tensor; Pascanu et al. 2013.
    """

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        unclipped = self._unclipped(step, self.max_norm)  # then so is every tensor's norm: all coefficients 1
        if unclipped is not None:
            return unclipped
        coefs = clip_coefficient(self.max_norm, step.norms)
        scale_(grads, coefs)
        clipped = combine_norms(step.norms.clamp(max=self.max_norm), self.norm_type)  # exact: no rounding noise
        return ClipStats(step.norm, clipped, self.max_norm, (coefs < 1).any())


class ClipByGlobalNorm(_MaxNormCallback):
    """Scale all selected gradients together so that their global norm is at most ``max_norm``.

    ``g *= min(1, max_norm / ||all g||)``: TensorFlow's ``clip_by_global_norm`` and torch's
    ``clip_grad_norm_``, without torch's ``1e-6`` epsilon (gradients under the threshold are left
    bit-for-bit unchanged). Each optimizer is clipped on the norm of its own parameters.

    Args:
        max_norm: the threshold on the global norm, a positive finite number.
        norm_type: order of the norm: any positive number, or ``inf``.
        skip_above: skip the optimizer step (as ``nonfinite="skip"`` does) when the pre-clip norm
            exceeds this, a loss spike too large to clip (as Megatron-style trainers do); counted in
            ``skipped_steps``. Above ``max_norm``; ``None`` (default) never skips.
        **kwargs: ``include``, ``exclude``, ``nonfinite``, ``max_consecutive_skips``, ``group_depth``,
            ``log_prefix``, ``report_every_n_steps`` (see
            :class:`GradientClipCallback`).

    Example YAML::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.ClipByGlobalNorm
              init_args:
                max_norm: 1.0
                skip_above: 100.0      # optional: skip the step of a larger spike

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural networks";
        ``tf.clip_by_global_norm``, ``torch.nn.utils.clip_grad_norm_``.
    """

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        unclipped = self._unclipped(step, self.max_norm)  # the coefficient is exactly 1
        if unclipped is not None:
            return unclipped
        coef = clip_coefficient(self.max_norm, step.norm)
        scale_(grads, coef)
        return ClipStats(step.norm, step.norm.clamp(max=self.max_norm), self.max_norm, coef < 1)
