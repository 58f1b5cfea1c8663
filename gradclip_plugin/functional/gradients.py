"""TensorFlow's ``compute_gradients`` / ``apply_gradients`` pipeline for torch optimizers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["apply_gradients", "compute_gradients"]


def compute_gradients(loss: Tensor, var_list: Sequence[Tensor]) -> list[tuple[Optional[Tensor], Tensor]]:
    """Gradients of ``loss`` with respect to ``var_list``, as ``(grad, var)`` pairs.

    As ``tf.compat.v1.train.Optimizer.compute_gradients``: a non-scalar ``loss`` is differentiated
    as its sum, and a variable that ``loss`` does not depend on gets ``None``. ``.grad`` is not touched.

    Args:
        loss: the tensor to differentiate.
        var_list: the tensors (parameters) to differentiate with respect to.

    Returns:
        A list of ``(grad or None, var)``, in ``var_list`` order.
    """
    var_list = list(var_list)
    if not var_list:
        raise ValueError("`var_list` must name at least one tensor, got an empty list")
    grads = torch.autograd.grad(loss.sum(), var_list, allow_unused=True)
    return list(zip(grads, var_list))


def apply_gradients(optimizer: torch.optim.Optimizer, grads_and_vars: Iterable[tuple[Optional[Tensor], Tensor]]) -> None:
    """Set each ``var.grad`` to its ``grad`` and take one optimizer step.

    A ``None`` gradient leaves its variable out of the step, as in TensorFlow; so does every
    parameter of the optimizer that is not listed (its ``.grad``, if any, is kept but not applied).

    Raises:
        ValueError: if a variable is not among the optimizer's parameters (its update would be lost).
    """
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    pairs = list(grads_and_vars)
    for i, (_, var) in enumerate(pairs):
        if id(var) not in known:
            raise ValueError(f"`grads_and_vars[{i}]` holds a variable of shape {tuple(var.shape)} that is not among the "
                             "optimizer's parameters; pass it to the optimizer when creating it")
    # Only the listed variables take part, as in TensorFlow: a stale `.grad` on another of the
    # optimizer's parameters is set aside for the step and put back after it.
    listed = {id(var) for _, var in pairs}
    others = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in listed]
    saved = [p.grad for p in others]
    for p in others:
        p.grad = None
    for grad, var in pairs:
        var.grad = grad
    try:
        optimizer.step()
    finally:
        for p, g in zip(others, saved):
            p.grad = g
