"""The fate of one optimizer step: decided before anything is done to it, acted on, and undone.

:func:`decide` turns the step's measured norm, the non-finite policy, ``skip_above``, the loss scaler and
what the optimizer can do into a :class:`Fate`: run the step, skip it on the host, or skip it on the
device (``optimizer.found_inf``, which torch's fused optimizers obey, where it is 1), or for a
non-finite norm raise or zero it. :class:`StepGuard` carries out a skip, keeps one record per
optimizer of what it did, and undoes it: right after the step, at the next step of the same
optimizer, at the batch's end, at teardown and on an exception. Torch only: the callbacks call it.

References: optax ``apply_if_finite`` (a policy with its own state); torch ``GradScaler`` (one record
per optimizer, ``found_inf`` removed right after the step); Lightning ``EarlyStopping`` (decide, then act).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

Action = Literal["run", "skip", "device", "zero", "error"]


class Fate(NamedTuple):
    """What happens to one optimizer's step, and why."""

    action: Action  #: ``"device"``: the step runs or is skipped on the device, as ``flag`` says
    host: Optional[float]  #: the norm read to the host, where it was read
    nonfinite: Union[bool, Tensor]  #: the norm is not finite (a 0-dim tensor where it was not read)
    spike: Union[bool, Tensor]  #: the norm is finite and above ``skip_above``
    flag: Optional[Tensor] = None  #: ``"device"``: 1.0 where the step is skipped (its ``found_inf``)


def decide(
    norm: Tensor, *, policy: str, scaler: bool, skip_above: Optional[float], read: bool, takes_flag: bool
) -> Fate:
    """The fate of a step whose selected gradients have total norm ``norm`` (a 0-dim tensor).

    Args:
        policy: ``"skip"``, ``"error"``, ``"zero"`` or ``"ignore"``: for a non-finite norm, unless a loss
            ``scaler`` is there, which skips such steps itself.
        skip_above: skip a step whose finite norm is above it (``None``: never).
        read: the rule needs the norm on the host anyway (then every decision is taken there).
        takes_flag: the optimizer obeys a ``found_inf`` and no other loss scaler can overwrite it: a skip
            can be left to the device, and nothing is read.
    """
    checks = not scaler and policy != "ignore"
    decides = checks or skip_above is not None  # else there is nothing to decide
    if takes_flag and not read and policy in ("skip", "ignore") and decides:
        finite = torch.isfinite(norm)
        spike = finite & (norm > skip_above) if skip_above is not None else torch.zeros_like(finite)
        return Fate("device", None, ~finite, spike, (spike | ~finite if checks else spike).float())
    if not (read or decides):
        return Fate("run", None, ~torch.isfinite(norm), False)
    host = norm.item()  # the one read of a step
    finite = math.isfinite(host)
    if checks and not finite:
        return Fate(policy, host, True, False)  # type: ignore[arg-type]  # "skip", "error" or "zero"
    spike = finite and skip_above is not None and host > skip_above
    return Fate("skip" if spike else "run", host, not finite, spike)


class _Record:
    """What was done to one optimizer's coming step, to be undone."""

    def __init__(self) -> None:
        self.hidden: list[tuple[Tensor, Tensor]] = []  #: the gradients taken away for a host skip
        self.pending = False  #: the gradients are to be taken away when the step begins
        self.flag: Optional[Tensor] = None  #: the ``found_inf`` given to the optimizer
        self.hooks: tuple[Any, ...] = ()  #: the step pre-hook that takes them away, the post-hook that undoes it all


class StepGuard:
    """Skips optimizer steps and undoes the skips, with one record per optimizer (held weakly: an
    optimizer that is gone takes its record along, and a new one never finds an old one's)."""

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def skip(self, optimizer: torch.optim.Optimizer, at_step: bool = False) -> None:
        """Make the coming ``optimizer.step()`` a no-op for this optimizer alone, on the host.

        Its gradients are taken away (torch optimizers pass over a parameter without one: weights and
        state, Adam's step count included, stay untouched) and put back right after that step, so that
        a parameter shared with another optimizer keeps its gradient for that optimizer's step. With
        ``at_step`` they are taken when the step begins (a step pre-hook), not now: in a loop another
        optimizer sharing a parameter may be clipped before this one steps, and a step that a loss
        scaler skips never takes them. (In a Trainer the hook runs inside ``step()``, after its pre-hooks.)
        """
        record = self._record(optimizer)
        record.pending = at_step
        if not at_step:
            self._hide(optimizer, record)

    @staticmethod
    def _hide(optimizer: torch.optim.Optimizer, record: _Record) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        record.hidden += [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        record.pending = False

    def flag(self, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
        """Skip the coming step on the device where ``flag`` is 1 (``found_inf``), with no host read;
        another callback's flag for the same step is kept (the step is skipped if either says so)."""
        other = optimizer.__dict__.get("found_inf")
        self._record(optimizer).flag = optimizer.found_inf = flag if other is None else torch.maximum(other, flag)

    def undo(self, optimizer: Optional[torch.optim.Optimizer] = None, restore: bool = True) -> None:
        """Undo what was done to the step of ``optimizer`` (of every optimizer if ``None``) and remove its
        post-hook: remove its ``found_inf`` and put back its gradients, or drop them (``restore=False``:
        the step never ran and new gradients have come since)."""
        for opt in list(self._records) if optimizer is None else [optimizer]:
            record = self._records.pop(opt, None)
            if record is not None:
                for hook in record.hooks:
                    hook.remove()
                self._after_step(opt, record, restore)

    @staticmethod
    def _after_step(optimizer: torch.optim.Optimizer, record: _Record, restore: bool = True) -> None:
        """Put back the hidden gradients and remove the ``found_inf`` (the hook stays: torch forbids
        removing one while it runs; :meth:`undo` removes it at the batch's end or the next step)."""
        for p, g in reversed(record.hidden) if restore else ():  # the newest first
            if p.grad is None:
                p.grad = g
        if record.flag is not None and optimizer.__dict__.get("found_inf") is record.flag:  # not another's
            del optimizer.found_inf
        record.hidden, record.flag, record.pending = [], None, False

    def _record(self, optimizer: torch.optim.Optimizer) -> _Record:
        record = self._records.get(optimizer)
        if record is None:
            record = self._records[optimizer] = _Record()
            record.hooks = (
                optimizer.register_step_pre_hook(lambda opt, *_: self._hide(opt, record) if record.pending else None),
                optimizer.register_step_post_hook(lambda opt, *_: self._after_step(opt, record)),
            )
        return record


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` obeys a device-side ``optimizer.found_inf`` (1: no change at all), as
    torch's fused Adam, AdamW and SGD do for ``GradScaler``.

    Not a fused SGD with momentum while any parameter with a gradient has no momentum buffer yet (its
    first step, or a param group added since): torch makes the buffers with ``empty_like``, and a
    skipped first step would leave them uninitialised.
    """
    if not (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and optimizer.defaults.get("fused")):
        return False
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    return all(
        "momentum_buffer" in optimizer.state.get(p, ())
        for group in optimizer.param_groups
        if group["momentum"]
        for p in group["params"]
        if p.grad is not None
    )
