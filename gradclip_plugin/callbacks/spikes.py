"""Spike skipping: an optimizer step whose loss or gradient norm spikes against its recent history is
skipped, OLMo-core's ``SkipStepOptimizer`` rule as a callback for any optimizer.

The arithmetic is :func:`gradclip_plugin.functional.adaptive.spike_update`, on the device; the skip
itself is the base class's (a fused optimizer's ``found_inf``, else its gradients hidden for the step).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.callbacks import _lightning as lightning
from gradclip_plugin.callbacks.base import (ClipStats, GradientClipCallback, GroupDepth, NormType, Step, Value, check_number,
    read_values, skips)
from gradclip_plugin.callbacks.step import Fate
from gradclip_plugin.functional.adaptive import SpikeWindow, spike_update
from gradclip_plugin.functional.norms import check_norm_type

__all__ = ["SkipSpikes", "SkippedStep"]

Watch = Literal["loss", "norm", "both"]
#: the skipped steps kept (the oldest are dropped first; ``skipped_steps`` counts them all)
MAX_RECORDS = 10_000
#: rows whose fate is still on the device are read with the metrics at logging steps, or when this many are
#: waiting (no logger, or a loop that asks for no metrics)
PENDING = 1024


class SkippedStep(NamedTuple):
    """One step :class:`SkipSpikes` skipped, a row of ``skipped_steps.csv``."""

    global_step: int
    batch_idx: Optional[int]  #: ``None`` in a loop without a Trainer
    optimizer: int  #: the optimizer's index
    loss: float  #: the step's loss (mean over ranks); NaN where none was given (a loop, ``watch="norm"``)
    norm: float  #: the step's pre-clip gradient norm


class SkipSpikes(GradientClipCallback):
    """Skip an optimizer step whose loss or gradient norm spikes: OLMo-core's rule, for any optimizer.

    Each optimizer keeps a window of the last ``window`` finite values of its step's loss and its
    gradients' global norm (``watch``). Once ``max(3, window // 2)`` values have been seen, this one
    included, a step whose value ``x`` has ``x - mean > sigma * std`` (``torch.std_mean``, unbiased, over
    the window before it) is skipped: its weights and optimizer state stay untouched, other optimizers
    step as usual. The step's values still enter the window, as in OLMo-core. On finite values it takes
    ``SkipStepOptimizer.get_step_factor``'s decisions (a full window's statistics are ``torch.std_mean``'s,
    a filling one's two passes in float64: a value within a float32 rounding of its bound may differ).

    Beyond it: a non-finite watched value (or gradient) skips its step and enters no window (OLMo-core's would be
    poisoned: it would skip the next ``window`` steps); with an optimizer that takes ``found_inf`` (fused
    Adam, AdamW, SGD) and no loss scaler the step is skipped on the device and the windows stay there,
    nothing read; ``max_consecutive_skips`` stops a run that skips on and on; the windows are saved in
    checkpoints, and a resumed run continues them exactly.

    **The loss** is the sum of the losses backward was called on since the last optimizer step (their
    mean under gradient accumulation, as Lightning divides them), unscaled under ``16-mixed`` and
    averaged over ranks; with several optimizers (manual optimization) each step takes the losses since
    the previous step of any optimizer, or that step's loss if there were none. In a Fabric or plain
    loop, pass it to :meth:`clip_gradients` (``loss=``). **The norm** is the global norm of the selected
    gradients (``include``, ``exclude``, ``norm_type``): place SkipSpikes before a clipping callback in
    ``callbacks`` and it decides on the pre-clip norm.

    **The record**: each skipped step's global step, batch index, optimizer, loss and norm, in
    :attr:`skipped` (the last ``MAX_RECORDS``), read with the metrics at logging steps, saved in
    checkpoints and written to ``skipped_steps.csv`` in the Trainer's ``log_dir`` at the end of the fit
    (and if it fails), which ``gradclip report`` lists.

    Logged: ``skipped_steps`` (the steps it skipped), ``norm`` and ``norm_max``, ``threshold`` (the norm's
    ``mean + sigma * std`` once active, with ``watch`` ``"norm"`` or ``"both"``), ``nonfinite_steps``. It
    never clips: it logs no ``clip_rate`` (and ``norm_clipped`` is its ``norm``).

    Args:
        window: values kept per optimizer (OLMo-core's ``rolling_interval_length``), at least 2.
        sigma: how many standard deviations above the mean is a spike (OLMo-core's ``sigma_factor``).
        watch: ``"loss"``, ``"norm"`` or ``"both"`` (a step is skipped if either spikes).
        norm_type: the order of the gradient norm.
        **kwargs: ``include``, ``exclude``, ``max_consecutive_skips``, ``group_depth``, ``log_prefix``,
            ``report_every_n_steps`` (see :class:`GradientClipCallback`; non-finite steps are always skipped).

    Example YAML (before the clipping callback)::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.SkipSpikes
              init_args:
                window: 128
                sigma: 6.0
            - class_path: gradclip_plugin.ClipByGlobalNorm
              init_args:
                max_norm: 1.0

    References:
        OLMo-core (``ai2-olmo-core``) ``olmo_core/optim/skip_step_optimizer.py``; OLMo Team 2025, "2 OLMo 2 Furious",
        arXiv 2501.00656.
    """

    def __init__(
        self,
        window: int = 128,
        sigma: float = 6.0,
        watch: Watch = "both",
        norm_type: NormType = 2.0,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        window = check_number("window", window, integer=True, valid=lambda v: v >= 2, what="an integer of at least 2 (128 in OLMo-core)")
        sigma = check_number("sigma", sigma, what="a positive number (6.0 in OLMo-core)")
        if watch not in ("loss", "norm", "both"):
            raise ValueError(f"`watch` must be one of ['loss', 'norm', 'both'], got {watch!r}")
        super().__init__(include=include, exclude=exclude, nonfinite="skip", max_consecutive_skips=max_consecutive_skips,
                         group_depth=group_depth, log_prefix=log_prefix, report_every_n_steps=report_every_n_steps)  # fmt: skip
        self.window, self.sigma, self.watch = window, sigma, watch
        self.norm_type = check_norm_type(norm_type)

    _per_optimizer = ("_tallies", "_windows")
    per_step_state, clips = True, False

    def _reset(self) -> None:
        super()._reset()
        self._windows: dict[int, SpikeWindow] = {}  # optimizer index -> its window
        self._loss: Optional[Tensor] = None  # the losses since the last optimizer step, summed
        self._step_loss: Optional[Tensor] = None  # the loss of the step being decided
        self._batch_idx: Optional[int] = None
        self._pending: list[tuple[int, Optional[int], int, list[Any]]] = []  # (global step, batch, optimizer, values to read)
        self._skipped: list[SkippedStep] = []

    @property
    def _skips_steps(self) -> bool:
        return True

    @property
    def skipped(self) -> list[SkippedStep]:
        """The steps skipped so far (the last ``MAX_RECORDS``; a resumed fit's include the checkpoint's), read now."""
        self._flush()
        return self._skipped

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_idx, self._step_loss = batch_idx, None  # no loss of an earlier batch is taken for this one's

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self.watch != "norm":
            loss = lightning.unscaled(trainer, loss.detach()).float()
            self._loss = loss + (0.0 if self._loss is None else self._loss)  # a new tensor: the user's loss is left as it is

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._loss is not None:  # the losses since the last step (of any optimizer), averaged over ranks
            self._step_loss, self._loss = trainer.strategy.reduce(self._loss, reduce_op="mean"), None
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_csv(trainer)  # first: the report's figure, written next, marks its steps
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        with contextlib.suppress(Exception):  # the steps skipped before a failure explain it; the failure is the one to raise
            self._save_csv(trainer)

    def clip_gradients(self, module: Any, optimizer: Any, *, loss: Optional[Tensor] = None, fabric: Any = None,
                       metrics: bool = True) -> dict[str, float]:  # fmt: skip
        """Decide ``optimizer``'s coming step in a Fabric or plain PyTorch loop, as in a Trainer: call it after
        the backward pass and before ``optimizer.step()``, with the step's ``loss`` (needed unless ``watch="norm"``;
        averaged over Fabric's ranks). A skipped step is a no-op of ``optimizer.step()``. Returns the metrics
        (see :meth:`GradientClipCallback.clip_gradients`); :meth:`to_csv` writes the steps skipped."""
        if loss is None and self.watch != "norm":
            raise ValueError(f"SkipSpikes(watch={self.watch!r}).clip_gradients needs the step's loss: pass `loss=loss`")
        if loss is not None:
            loss = torch.as_tensor(loss).detach().float().clone()  # a copy: reduced in place across ranks
            if loss.numel() != 1:
                raise ValueError(f"`loss` must be the step's loss, one number (its mean over the batch), got shape {tuple(loss.shape)}")
            self._step_loss = fabric.all_reduce(loss.reshape(()), reduce_op="mean") if fabric is not None else loss.reshape(())
        return super().clip_gradients(module, optimizer, fabric=fabric, metrics=metrics)

    # ------------------------------------------------------------------ the rule
    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        if self._step_loss is None and self.watch != "norm":
            raise RuntimeError(
                f"SkipSpikes(watch={self.watch!r}): Lightning passed no loss to `on_before_backward` in this batch before its "
                "optimizer step (in manual optimization, call `self.manual_backward(loss)`, not `loss.backward()`); or "
                "watch the norm alone (`watch='norm'`)."
            )
        values = {"loss": [self._step_loss], "norm": [step.norm], "both": [self._step_loss, step.norm]}[self.watch]
        record = step.sample if step.skip is None else step.sample & ~step.skip  # not the zeroed norms of a skipped step
        window, spike, limits = spike_update(self._windows.get(step.idx), torch.stack([v.to(step.norm) for v in values]),
                                             window=self.window, sigma=self.sigma, record=record)  # fmt: skip
        self._windows[step.idx] = window
        unless_skipped = lambda v: torch.where(spike, math.nan, v)  # noqa: E731 - a skipped step claims no post-clip norm
        threshold = unless_skipped(limits[-1]) if self.watch != "loss" else math.nan
        return ClipStats(step.norm, unless_skipped(step.norm), threshold, False, skip=spike)

    def _count(self, idx: int, fate: Fate, stats: ClipStats, global_step: int) -> None:
        skipped = skips(fate, stats)
        if isinstance(skipped, Tensor) or skipped:  # a row, read with the metrics (or at `PENDING`, a checkpoint, the end)
            loss = math.nan if self._step_loss is None else self._step_loss
            self._pending.append((global_step, self._batch_idx, idx, [loss, stats.norm, skipped]))
            if len(self._pending) >= PENDING:
                self._flush()
        super()._count(idx, fate, stats, global_step)

    def _private_reads(self, idx: Optional[int] = None) -> dict[str, Value]:
        rows = [v for *_, row in self._pending for v in row]
        return {**super()._private_reads(idx), **{f"\0row{i}": v for i, v in enumerate(rows)}}

    def _written(self, values: dict[str, float]) -> None:
        if "\0row0" in values:
            self._keep([values.pop(f"\0row{i}") for i in range(3 * len(self._pending))])
        super()._written(values)

    def _flush(self) -> None:
        """Read the pending rows (one device-to-host copy) and keep those of skipped steps."""
        self._keep(read_values([v for *_, row in self._pending for v in row]))

    def _keep(self, values: list[float]) -> None:
        """Keep the pending rows of skipped steps, given their ``values`` read."""
        for i, (global_step, batch_idx, idx, _) in enumerate(self._pending):
            loss, norm, skipped = values[3 * i : 3 * i + 3]
            if skipped:
                self._skipped.append(SkippedStep(global_step, batch_idx, idx, loss, norm))
        self._pending = []
        del self._skipped[:-MAX_RECORDS]

    # ------------------------------------------------------------------ the record
    def to_csv(self, path: Union[str, os.PathLike]) -> None:
        """Write the steps skipped so far to ``path``, a row each (``global_step,batch_idx,optimizer,loss,norm``)."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SkippedStep._fields)
            writer.writerows(("" if v is None else v for v in row) for row in self.skipped)

    def _save_csv(self, trainer: Any) -> None:
        """``skipped_steps.csv`` in the Trainer's ``log_dir`` (``skipped_steps-<k>.csv`` for a k-th SkipSpikes)."""
        k = [cb for cb in trainer.callbacks if isinstance(cb, SkipSpikes)].index(self)
        if trainer.is_global_zero and trainer.loggers and trainer.log_dir:
            os.makedirs(trainer.log_dir, exist_ok=True)
            self.to_csv(os.path.join(trainer.log_dir, f"skipped_steps{f'-{k}' if k else ''}.csv"))

    def state_dict(self) -> dict[str, Any]:
        windows = {i: {"values": w.values.tolist(), "count": int(w.count)} for i, w in self._windows.items()}
        return {**super().state_dict(), "watch": self.watch, "windows": windows, "skipped": [list(r) for r in self.skipped]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._skipped = [SkippedStep(*r) for r in state_dict.get("skipped", [])]
        shape = [self.window, 2 if self.watch == "both" else 1]
        saved = state_dict.get("windows", {})
        if saved and state_dict.get("watch", self.watch) != self.watch or any(len(w["values"]) != shape[0] or len(w["values"][0]) != shape[1] for w in saved.values()):
            lightning.rank_zero_warn(f"SkipSpikes: the checkpoint's windows are not of `window={self.window}, watch={self.watch!r}`; they start afresh.")
            return
        self._windows = {int(i): SpikeWindow(torch.tensor(w["values"], dtype=torch.float32), torch.tensor(int(w["count"]))) for i, w in saved.items()}
