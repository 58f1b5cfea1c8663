"""GradientNormMonitor: the total gradient norm of every step, and one norm per group, from one fused pass."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from gradclip_plugin import names
from gradclip_plugin.callbacks import _lightning as lightning
from gradclip_plugin.callbacks.base import (EXACT_UNDER_SCALE, GradientCallback, GroupDepth, NormType, Plan, Value,
    check_group_depth, check_number, _fmax, read_metrics)
from gradclip_plugin.functional import combine_norms, tensor_norms
from gradclip_plugin.functional.norms import check_norm_type

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(GradientCallback):
    """Log the total gradient norm, its largest value between logs, and one norm per group of parameters.

    Logs ``grad_norm/total``, ``grad_norm/total_max`` (the largest total norm of every step since the
    last log: a spike between logging steps is not missed), ``grad_norm/nonfinite_steps`` (every step
    counted) and ``grad_norm/<group>`` (``grad_norm/opt<i>/...`` when the Trainer has several
    optimizers) every ``Trainer(log_every_n_steps=...)`` optimizer steps, to every logger. The total is
    measured at every step on the device (one ``torch._foreach_norm`` per device and dtype), with no
    host read; the group norms come from the same pass on logging steps, read in one device-to-host
    copy; weights, update ratios and histograms are on logging (histogram) steps only.

    It reads the gradients in ``on_before_optimizer_step``, in the order of ``Trainer(callbacks=[...])``:
    placed **before** a clipping callback it logs the pre-clip norms, placed **after** it the
    post-clip norms. Use two monitors with different ``log_prefix`` to see both. For the pre-clip
    group norms alone, a clipping callback's own ``group_depth`` logs them from the norms it measures
    anyway, with no second pass over the gradients.

    Args:
        norm_type: order of the norm: any positive number, or ``inf``.
        group_depth: how parameters are grouped: an ``int`` cuts module names at that depth
            (``1``: ``encoder.layers.0.weight`` -> ``encoder``; ``2``: -> ``encoder.layers``);
            ``"parameter"`` gives one group per parameter; ``"auto"`` picks the depth that gives
            the most groups without going above ten.
        histogram_every_n_steps: with a ``TensorBoardLogger``, also write a histogram of the
            gradient values of each group every this many optimizer steps; ``None`` for none.
        weight_norms: also log the norm of each group's weights before the step, ``<prefix>/weight/<group>``.
        update_ratio: also log ``||w_after - w_before|| / ||w_before||`` of each group over the step,
            ``<prefix>/update_ratio/<group>`` (about 1e-3 is the usual guideline; much larger means a
            too large learning rate). It copies the selected weights on logging steps (only then),
            and is logged at the same step as the step's gradient norms. Both in a Trainer only.
        include: fnmatch patterns on ``named_parameters()`` names; only matching parameters are
            counted. ``None`` selects every parameter.
        exclude: fnmatch patterns of parameters left out.
        log_prefix: prefix of the logged metric names; give two monitors different prefixes.
        report_every_n_steps: also write ``gradclip report``'s figure to TensorBoard's Images tab every
            this many optimizer steps (see :class:`GradientClipCallback`); ``None`` for the end only.

    Example YAML (pre- and post-clip norms around a clipping callback)::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.GradientNormMonitor
              init_args:
                log_prefix: grad_norm          # before the clipping callback: pre-clip
                histogram_every_n_steps: 100
            - class_path: gradclip_plugin.ClipByGlobalNorm
              init_args:
                max_norm: 1.0
            - class_path: gradclip_plugin.GradientNormMonitor
              init_args:
                log_prefix: grad_norm_clipped  # after it: post-clip

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural networks" (monitoring
        the gradient norm to detect explosion); replaces Lightning's per-parameter ``grad_norm``.
    """

    def __init__(
        self,
        norm_type: NormType = 2.0,
        group_depth: GroupDepth = "auto",
        histogram_every_n_steps: Optional[int] = None,
        weight_norms: bool = False,
        update_ratio: bool = False,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        log_prefix: str = "grad_norm",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        for name, flag in (("weight_norms", weight_norms), ("update_ratio", update_ratio)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}")
        self.weight_norms, self.update_ratio = weight_norms, update_ratio
        self.norm_type = check_norm_type(norm_type)
        check_group_depth(group_depth)
        self.histogram_every_n_steps = check_number("histogram_every_n_steps", histogram_every_n_steps, allow_none=True,
                                                    integer=True, what="a positive int")  # fmt: skip
        super().__init__(include=include, exclude=exclude, group_depth=group_depth, log_prefix=log_prefix,
                         report_every_n_steps=report_every_n_steps)  # fmt: skip

    _per_optimizer = ("_nonfinite", "_max")

    def _reset(self) -> None:
        super()._reset()
        self._pending: dict[int, dict[str, Value]] = {}  # the norms to write, per optimizer index
        self._nonfinite: dict[int, Value] = {}  # steps whose norm was not finite, per optimizer
        self._max: dict[int, Value] = {}  # the largest finite total norm since the last log, per optimizer
        self._warned = False
        self._before: dict[int, tuple[Plan, list[Tensor], dict[str, Tensor]]] = {}  # for update ratios
        self._hooks: list[Any] = []  # step post-hooks, removed at the batch's end (not while they run)

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": {i: int(n) for i, n in self._nonfinite.items()}, "total_max": {i: float(m) for i, m in self._max.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._nonfinite = {int(i): int(n) for i, n in state_dict.get("nonfinite_steps", {}).items()}
        self._max = {int(i): float(m) for i, m in state_dict.get("total_max", {}).items()}  # a spike before the resume

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        for optimizer in trainer.optimizers:  # the groups, for the TensorBoard layout
            self._plan(optimizer, pl_module)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._state_key = self._make_state_key()  # two monitors have two prefixes (refused otherwise)
        same = [cb for cb in trainer.callbacks if isinstance(cb, GradientNormMonitor) and cb.log_prefix == self.log_prefix]
        if len(same) > 1:
            raise lightning.misconfiguration(
                trainer, f"{len(same)} GradientNormMonitor callbacks share `log_prefix={self.log_prefix!r}` and would log to the "
                "same metric names. Give each its own, e.g. `log_prefix='grad_norm'` before the clipping callback and "
                "`log_prefix='grad_norm_clipped'` after it.")
        if self.histogram_every_n_steps is not None and not lightning.tensorboard_writers(trainer):
            lightning.rank_zero_warn(
                f"GradientNormMonitor(histogram_every_n_steps={self.histogram_every_n_steps}) writes histograms to a "
                "TensorBoardLogger only, and the Trainer has none: no histogram will be written.")

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        log = lightning.should_log(trainer)
        every, step = self.histogram_every_n_steps, lightning.log_step(trainer)
        if not trainer.loggers:
            return  # nothing would be written
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        plan = self._plan(optimizer, pl_module)
        scale = lightning.pending_scale(lightning.loss_scaler(trainer), optimizer, self.norm_type in EXACT_UNDER_SCALE)
        self._measure(plan, idx, log, scale)
        if log and (self.weight_norms or self.update_ratio) and plan.params:
            self._weights(optimizer, plan, idx)
        for writer, tag_prefix in lightning.tensorboard_writers(trainer) if every is not None and step % every == 0 else []:
            self._histograms(writer, tag_prefix, plan, idx, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._forget_weights()
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._forget_weights()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._forget_weights()

    def gradient_norms(self, module: Any, optimizer: Any, *, fabric: Any = None, metrics: bool = True) -> dict[str, float]:
        """The norms this monitor logs in a Trainer (one optimizer's), in a Fabric or plain PyTorch loop.

        Call it after the backward pass and before ``optimizer.step()`` (before or after a clipping
        callback's ``clip_gradients``: pre- or post-clip norms), at every step: ``metrics=False`` keeps
        the step's total (for ``total_max``) and reads nothing. Under Fabric's loss scaler the gradients
        are unscaled first. One device-to-host copy where ``metrics``.

        Returns:
            ``{"grad_norm/total": ..., "grad_norm/total_max": ..., "grad_norm/<group>": ...}``, ready for
            ``fabric.log_dict``; ``{}`` without ``metrics``.
        """
        optimizer, plan, idx, _ = self._loop_step(module, optimizer, fabric)
        self._measure(plan, idx, metrics)
        return read_metrics(self._pop_metrics(idx)) if metrics else {}

    # ------------------------------------------------------------------ helpers
    def _weights(self, optimizer: torch.optim.Optimizer, plan: Plan, idx: int) -> None:
        """The group norms of the weights before the step; with ``update_ratio``, a copy of them, compared
        with the weights after the step by a step post-hook, removed once it has run."""
        weights = [p.detach() for p in plan.params]
        norms = self._group_norms(plan, range(len(weights)), tensor_norms(weights, self.norm_type, shard_group=self._shard_group), self.norm_type)
        if self.weight_norms:
            self._pending.setdefault(idx, {}).update((f"{names.WEIGHT}/{g}", n) for g, n in norms.items())
        if self.update_ratio:
            self._hooks.append(optimizer.register_step_post_hook(lambda opt, *_: self._after_step(idx)))
            self._before[idx] = (plan, torch._foreach_mul(weights, 1.0), norms)  # one foreach copy

    @torch.no_grad()
    def _after_step(self, idx: int) -> None:
        if idx not in self._before:
            return
        plan, before, weight_norms = self._before.pop(idx)
        deltas = torch._foreach_sub([p.detach() for p in plan.params], before)
        norms = tensor_norms(deltas, self.norm_type, shard_group=self._shard_group)
        ratios = self._group_norms(plan, range(len(deltas)), norms, self.norm_type)
        self._pending.setdefault(idx, {}).update((f"{names.UPDATE_RATIO}/{g}", n / weight_norms[g]) for g, n in ratios.items())

    def _forget_weights(self) -> None:
        """Remove the post-hooks, and the weights of steps that never ran: nothing is left on an optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._before = [], {}

    @torch.no_grad()
    def _measure(self, plan: Plan, idx: int, log: bool, scale: Optional[Tensor] = None) -> None:
        """Count this step's total norm of the gradients of ``plan`` (divided by the loss ``scale`` still on
        them, if any), on the device; on a logging step (``log``), keep it and the group norms to write."""
        _, grads, positions = self._gradients(plan)
        if not grads:
            return
        norms = tensor_norms(grads, self.norm_type, shard_group=self._shard_group)
        if scale is not None:
            norms = norms / scale.to(norms.device)
        total = combine_norms(norms, self.norm_type)
        finite = torch.isfinite(total)
        self._nonfinite[idx] = self._nonfinite.get(idx, 0) + ~finite  # no host read
        self._max[idx] = _fmax(self._max.get(idx, float("nan")), torch.where(finite, total, float("nan")))
        if log:
            pending = self._pending.setdefault(idx, {})
            pending.update({names.TOTAL: total, names.NONFINITE_STEPS: self._nonfinite[idx]})  # TOTAL_MAX: when read
            ours = (names.TOTAL, names.TOTAL_MAX, names.NONFINITE_STEPS, names.WEIGHT, names.UPDATE_RATIO)
            pending.update((g if g not in ours else f"{g}_", n) for g, n in self._group_norms(plan, positions, norms, self.norm_type).items())

    def _pop_metrics(self, idx: Optional[int] = None) -> dict[str, Value]:
        for i, values in self._pending.items():  # the largest total of every step since the last read, several a batch too
            if idx in (None, i) and names.TOTAL in values:
                values[names.TOTAL_MAX] = self._max.pop(i, float("nan"))
        out = {self._metric_key(k, i): v for i, values in self._pending.items() if idx in (None, i) for k, v in values.items()}
        self._pending = {i: v for i, v in self._pending.items() if idx not in (None, i)}
        return out

    def _histograms(self, writer: Any, tag_prefix: str, plan: Plan, idx: int, step: int) -> None:
        """A histogram of each group's gradient values (TensorBoard bins them on the host: histogram steps only)."""
        _, grads, positions = self._gradients(plan)
        members: dict[int, list[Tensor]] = {}
        for i, g in zip(positions, grads):
            members.setdefault(plan.groups[i], []).append(g.detach().reshape(-1).float().cpu())
        for group, parts in members.items():
            values = torch.cat(parts)
            values = values[torch.isfinite(values)]  # TensorBoard cannot bin inf or NaN
            name = plan.group_names[group]
            if values.numel():  # in a section of their own: gradient values, not norms
                opt = f"opt{idx}/" if self._n_optimizers > 1 else ""
                writer.add_histogram(f"{tag_prefix}grad_values/{self.log_prefix}/{opt}{name}", values, global_step=step)
            elif not self._warned:
                self._warned = True
                lightning.rank_zero_warn(f"GradientNormMonitor: no histogram of `{name}` at step {step}: every gradient value "
                                         "is inf or NaN (TensorBoard cannot bin them). Such steps are counted in "
                                         f"`{self.log_prefix}/nonfinite_steps`; this warning is shown once.")
