"""Clipping rules: TensorFlow's three out-of-place ops and torch-style in-place forms for training.

Out of place (``clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm``) follow ``tf.clip_by_*``:
same names, arguments and results, inputs never modified.

In place (names ending in ``_``) follow ``torch.nn.utils.clip_grad_*_``, "measure, then clip": the
norm is computed once and returned, the coefficient is ``min(1, max_norm / norm)`` with no epsilon
(a tensor at or under the threshold is multiplied by exactly 1.0), and nothing reads a value back to
the host, so the ops can run every step on a GPU without a sync. They take what torch's take:
parameters (``nn.Parameter``, frozen or not), whose ``.grad`` they clip, or the gradients themselves;
a weight is never changed. The out-of-place forms take gradients only and refuse an ``nn.Parameter``.
Complex gradients are measured by their entries' moduli and scaled by a real coefficient, as torch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.functional.distributed import has_dtensor, local_tensor
from gradclip_plugin.functional.norms import Tensors, as_tensor_list, check_positive, global_norm, tensor_norms
from gradclip_plugin.functional.norms import check_real, group_by_device_and_dtype

__all__ = ["clip_by_global_norm", "clip_by_global_norm_", "clip_by_norm", "clip_by_norm_", "clip_by_value", "clip_by_value_",
           "clip_coefficient", "scale_"]

Number = Union[float, int]


@torch.no_grad()
def clip_by_value(t: Tensor, clip_value_min: Union[Number, Tensor], clip_value_max: Union[Number, Tensor]) -> Tensor:
    """Clip every entry of ``t`` to ``[clip_value_min, clip_value_max]``, as ``tf.clip_by_value``.

    Computed in TensorFlow's order, ``maximum(minimum(t, clip_value_max), clip_value_min)``.

    Args:
        t: the tensor to clip (not modified).
        clip_value_min: lower bound, a number or a tensor broadcastable to ``t``.
        clip_value_max: upper bound, a number or a tensor broadcastable to ``t``.

    Returns:
        A new tensor of ``t``'s shape and dtype.

    Raises:
        TypeError: if ``t`` is an ``nn.Parameter`` (use :func:`clip_by_value_` on parameters).
        ValueError: if both bounds are numbers and ``clip_value_min > clip_value_max``.

    References:
        TensorFlow, ``tf.clip_by_value``.
    """
    refuse_parameters("clip_by_value", [t])
    if not isinstance(clip_value_min, Tensor) and not isinstance(clip_value_max, Tensor):
        if clip_value_min > clip_value_max:
            raise ValueError(f"`clip_value_min` must be <= `clip_value_max`, got {clip_value_min!r} > {clip_value_max!r}")
        return t.clamp_max(clip_value_max).clamp_min(clip_value_min)
    hi = torch.as_tensor(clip_value_max, dtype=t.dtype, device=t.device)
    lo = torch.as_tensor(clip_value_min, dtype=t.dtype, device=t.device)
    out = torch.maximum(torch.minimum(t, hi), lo)
    if out.shape != t.shape:
        raise ValueError(f"clipping bounds must not broadcast `t` of shape {tuple(t.shape)} to {tuple(out.shape)}")
    return out


@torch.no_grad()
def clip_by_norm(t: Tensor, clip_norm: Union[Number, Tensor], axes: Optional[Sequence[int]] = None) -> Tensor:
    """Rescale ``t`` so that its L2-norm (over ``axes``) is at most ``clip_norm``, as ``tf.clip_by_norm``.

    ``t * clip_norm / max(l2norm(t, axes), clip_norm)``, computed in TensorFlow's order; a zero
    tensor (or zero slice along ``axes``) is returned unchanged. float16/bfloat16 inputs are
    computed in float32 and cast back, so their squares cannot overflow.

    Args:
        t: the tensor to clip (not modified).
        clip_norm: the maximum norm, a positive number or a 0-dim tensor.
        axes: dimensions to take the norm over (one norm per remaining index); ``None`` for all.

    Returns:
        A new tensor of ``t``'s shape and dtype (a complex one scaled by the norm of its moduli).

    Raises:
        TypeError: if ``t`` is an ``nn.Parameter`` (use :func:`clip_by_norm_` on parameters).

    References:
        TensorFlow, ``tf.clip_by_norm``.
    """
    refuse_parameters("clip_by_norm", [t])
    check_positive("clip_norm", clip_norm)
    x = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    # torch's reduction computes TF's sqrt(sum(t * t)) with a correctly rounded root (the CPU's
    # vectorised sqrt of a tensor can be an ulp off); a zero slice has norm 0 and is left unchanged.
    l2norm = torch.linalg.vector_norm(x, 2, dim=None if axes is None else tuple(axes), keepdim=True)
    clip = torch.as_tensor(clip_norm, dtype=l2norm.dtype, device=x.device)  # real, as the norm of complex `x`
    return ((x * clip) / torch.maximum(l2norm, clip)).to(t.dtype)


@torch.no_grad()
def clip_by_global_norm(t_list: Sequence[Optional[Tensor]], clip_norm: Union[Number, Tensor],
                        use_norm: Optional[Tensor] = None) -> tuple[list[Optional[Tensor]], Tensor]:  # fmt: skip
    """Scale every tensor by ``clip_norm / max(global_norm, clip_norm)``, as ``tf.clip_by_global_norm``.

    Args:
        t_list: tensors to clip (not modified); ``None`` entries are returned as ``None``.
        clip_norm: the maximum global norm, a positive number or a 0-dim tensor.
        use_norm: the global norm to use; computed with :func:`global_norm` if ``None``.

    Returns:
        ``(clipped, global_norm)``. If the global norm is not finite, every returned tensor is NaN
        (TensorFlow's signal), and ``global_norm`` is returned as computed (inf or NaN).
        float16/bfloat16 tensors are multiplied in float32 and rounded once (TensorFlow casts the
        scale to the tensor's dtype first, which can overshoot for tiny coefficients).

    Raises:
        TypeError: for a single tensor, or an ``nn.Parameter`` in ``t_list`` (use
            :func:`clip_by_global_norm_` on parameters).

    References:
        TensorFlow, ``tf.clip_by_global_norm``; Pascanu et al. 2013, "On the difficulty of
        training recurrent neural networks".
    """
    if isinstance(t_list, Tensor):
        raise TypeError("`t_list` must be a sequence of tensors, got a single tensor; wrap it in a list")
    t_list = list(t_list)
    refuse_parameters("clip_by_global_norm", t_list)
    check_positive("clip_norm", clip_norm)
    norm = global_norm(t_list) if use_norm is None else torch.as_tensor(use_norm)
    clip = torch.as_tensor(clip_norm, dtype=norm.dtype, device=norm.device)
    # `norm - norm` is 0 for a finite norm and NaN otherwise: TensorFlow's non-finite signal.
    scale = clip / torch.maximum(norm, clip) + (norm - norm)
    return [None if t is None else _scaled(t, scale) for t in t_list], norm


def is_parameter(t: Tensor) -> bool:
    """Whether ``t`` is a parameter: an ``nn.Parameter`` (frozen or not) or another leaf tensor that requires grad."""
    return isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)


def as_gradients(tensors: Tensors) -> list[Tensor]:
    """The tensors to clip: a parameter (:func:`is_parameter`) stands for its ``.grad``, skipped if ``None``;
    any other tensor (a gradient) for itself. So ``model.parameters()`` clips the gradients, frozen layers'
    included, as ``torch.nn.utils.clip_grad_norm_`` does, and never the weights."""
    grads = (t.grad if is_parameter(t) else t for t in as_tensor_list(tensors))
    return [g for g in grads if g is not None]


def refuse_parameters(op: str, tensors: list[Optional[Tensor]]) -> None:
    """Raise ``TypeError`` for an ``nn.Parameter`` given to the out-of-place ``op``, naming its in-place form."""
    for t in tensors:
        if isinstance(t, torch.nn.Parameter):
            raise TypeError(f"{op} takes gradients, got an nn.Parameter of shape {tuple(t.shape)}: to clip parameters' "
                            f"gradients in place use {op}_(model.parameters(), ...)")


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's shards of any DTensors (in-place ops on them reach the DTensors), the rest as they are."""
    return [local_tensor(t) for t in tensors] if has_dtensor(tensors) else tensors


def _scaled(t: Tensor, scale: Tensor) -> Tensor:
    """``t * scale`` rounded once to ``t``'s dtype; half tensors are multiplied in float32, since a
    coefficient cast to float16 first can round to a subnormal and overshoot the threshold."""
    scale = scale.to(t.device)
    if t.dtype in (torch.float16, torch.bfloat16):
        return (t.float() * scale.float()).to(t.dtype)
    return t * scale.to(t.dtype)


@torch.no_grad()
def clip_coefficient(max_norm: Union[Number, Tensor], norm: Tensor) -> Tensor:
    """``min(1, max_norm / norm)``, with no epsilon: exactly 1.0 when ``norm <= max_norm`` (and for 0).

    ``max_norm`` is made a tensor first: ``float / tensor`` dispatches to ``Tensor.__rtruediv__``,
    which computes ``reciprocal(norm) * max_norm`` and can give ``1 - ulp`` for ``norm == max_norm``.
    """
    if not isinstance(max_norm, Tensor):  # a fill kernel, not a host-to-device copy
        max_norm = torch.full_like(norm, max_norm)
    return torch.clamp(torch.div(max_norm, norm), max=1.0)


@torch.no_grad()
def scale_(tensors: Tensors, coef: Union[Tensor, float]) -> None:
    """Multiply tensors in place by ``coef``: a 0-dim tensor or a Python float for all, or a 1-D tensor,
    one per tensor.

    Uses the foreach kernels per (device, dtype) group; reads nothing back to the host. A DTensor
    is scaled through its local shard (DTensor's foreach ops refuse lists mixing it with plain tensors);
    a complex tensor through its real view, each part multiplied by the real coefficient.
    """
    tensors = _local(as_tensor_list(tensors))
    if not tensors:
        return
    per_tensor = isinstance(coef, Tensor) and coef.dim() == 1
    groups = group_by_device_and_dtype(tensors)
    for (device, dtype), idx in groups.items():
        group = tensors if len(groups) == 1 else [tensors[i] for i in idx]
        if dtype.is_complex:  # (a + bi) * (c + 0i) would make inf * 0 = NaN where the part is inf
            group = [torch.view_as_real(t) for t in group]
        # a float becomes a float32 0-dim tensor (a fill kernel, no copy): torch's CPU foreach kernels
        # round a Python-float factor to the tensors' dtype first, which for float16 can overshoot
        c = coef.to(device) if isinstance(coef, Tensor) else torch.full((), coef, dtype=torch.float32, device=device)
        if per_tensor:
            parts = c.unbind()  # views: indexing with a Python list would copy an index tensor to the device
            torch._foreach_mul_(group, [parts[i] for i in idx])
        else:
            torch._foreach_mul_(group, c)


@torch.no_grad()
def clip_by_value_(tensors: Tensors, clip_value: Number) -> None:
    """Clamp every entry to ``[-clip_value, clip_value]`` in place, as ``torch.nn.utils.clip_grad_value_``.

    Args:
        tensors: parameters (their ``.grad`` is clamped) or gradients, one or an iterable.
        clip_value: the bound, a positive finite number.

    Raises:
        ValueError: for complex gradients, which have no order (torch's ``clip_grad_value_`` raises
            ``NotImplementedError`` for them: "clamp is not supported for complex types"); nothing is
            clamped then.

    References:
        Mikolov 2012 (thesis), Pascanu et al. 2013: element-wise gradient clipping.
    """
    check_positive("clip_value", clip_value)
    tensors = _local(as_gradients(tensors))
    groups = group_by_device_and_dtype(tensors) if tensors else {}
    for _, dtype in groups:  # all checked before any is clamped
        check_real(dtype, "clip_by_value_", "tensors")
    for idx in groups.values():
        group = [tensors[i] for i in idx]
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)


@torch.no_grad()
def clip_by_norm_(tensors: Tensors, max_norm: Union[Number, Tensor], norm_type: float = 2.0) -> Tensor:
    """Clip each tensor to norm ``max_norm`` on its own, in place: ``t *= min(1, max_norm / ||t||)``.

    Args:
        tensors: parameters (their ``.grad`` is clipped) or gradients, one or an iterable.
        max_norm: the per-tensor threshold, a positive number or a 0-dim tensor.
        norm_type: order of the norm, positive or ``inf``.

    Returns:
        The pre-clip norm of each tensor, a 1-D float32 tensor.

    References:
        TensorFlow, ``tf.clip_by_norm`` (per tensor); Pascanu et al. 2013.
    """
    check_positive("max_norm", max_norm)
    tensors = as_gradients(tensors)
    norms = tensor_norms(tensors, norm_type)
    scale_(tensors, clip_coefficient(max_norm, norms))
    return norms


@torch.no_grad()
def clip_by_global_norm_(tensors: Tensors, max_norm: Union[Number, Tensor], norm_type: float = 2.0) -> Tensor:
    """Scale all tensors in place by ``min(1, max_norm / global_norm)``.

    Same as ``torch.nn.utils.clip_grad_norm_`` on the tensors themselves, without its ``1e-6``
    epsilon: a total norm at or under ``max_norm`` leaves the tensors bit-for-bit unchanged.

    Args:
        tensors: parameters (their ``.grad`` is clipped, as by torch) or gradients, one or an iterable.
        max_norm: the threshold on the global norm, a positive number or a 0-dim tensor.
        norm_type: order of the norm, positive or ``inf``.

    Returns:
        The pre-clip global norm, a 0-dim float32 tensor.

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural networks".
    """
    check_positive("max_norm", max_norm)
    tensors = as_gradients(tensors)
    norm = global_norm(tensors, norm_type)
    scale_(tensors, clip_coefficient(max_norm, norm))
    return norm
