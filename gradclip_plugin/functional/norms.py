"""Gradient norms: per tensor, global and per subset, from one fused pass.

Tensors are grouped by (device, dtype) with torch's own grouping, and each group is one
``torch._foreach_norm(..., dtype=torch.float32)`` call (float64 stays float64), as in torch's
``torch.nn.utils.get_total_norm``: half-precision tensors are measured in float32, whatever their
dtype. A complex tensor is measured by its entries' moduli, as torch does, in float32 (float64 for
complex128). Nothing here reads a value back to the host.

Sharded tensors (``DTensor``, as FSDP2 and tensor parallelism store gradients; FSDP1 flat shards
with ``shard_group=``) are measured as the full tensors they are shards of: see
:mod:`gradclip_plugin.functional.distributed`. Everything built on :func:`tensor_norms` (global,
per-group and per-tensor norms, the clipping coefficients) then holds the full tensors' values, the
same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.functional.distributed import has_dtensor, local_tensor, reduce_shard_norms, shard_groups

Tensors = Union[Tensor, Iterable[Optional[Tensor]]]

__all__ = ["Tensors", "combine_norms", "global_norm", "subset_norms", "tensor_norms"]


def as_tensor_list(tensors: Tensors) -> list[Tensor]:
    """Return ``tensors`` as a list, a single tensor wrapped and ``None`` entries dropped."""
    if isinstance(tensors, Tensor):
        return [tensors]
    return [t for t in tensors if t is not None]


def check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive finite number (or ``None`` if allowed).

    A tensor is let through unread (a host read would be a sync): its caller owns its range.
    """
    if isinstance(value, Tensor) or (value is None and allow_none):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def check_norm_type(norm_type: Any) -> float:
    """Return ``norm_type`` as a float: any positive number or ``inf`` (``"inf"`` from YAML).

    Raises:
        ValueError: naming ``norm_type`` and the value, for anything else (NaN, a string, ``None``, a bool).
    """
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(norm_type, bool) or not value > 0:  # `not > 0` also rejects NaN
        raise ValueError(f"`norm_type` must be a positive number or 'inf', got {norm_type!r}")
    return value


def check_real(dtype: torch.dtype, op: str, arg: str) -> None:
    """Raise ``ValueError`` naming ``op`` and ``arg`` for a complex ``dtype``, which ``op`` has no rule for."""
    if dtype.is_complex:
        raise ValueError(f"{op} does not support complex parameters, got {dtype} in `{arg}`. Clip complex gradients by norm "
                         "(clip_by_norm_, clip_by_global_norm_), which measures them by their entries' moduli.")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32. A complex dtype gives
    complex128 or complex64, the ``dtype=`` that torch's norms take for it (their result is real)."""
    if dtype.is_complex:
        return torch.complex128 if dtype == torch.complex128 else torch.complex64
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in input order within a group (torch's C++ grouping)."""
    grouped = torch._C._group_tensors_by_device_and_dtype([list(tensors)], True)
    return {key: indices for key, (_, indices) in grouped.items()}


@torch.no_grad()
def tensor_norms(tensors: Tensors, norm_type: float = 2.0, *, shard_group: Optional[Any] = None) -> Tensor:
    """The ``norm_type``-norm of each tensor, as a 1-D tensor on the first tensor's device.

    Args:
        tensors: a tensor or an iterable of tensors; ``None`` entries are skipped.
        norm_type: order of the norm, any positive float or ``inf``.
        shard_group: a ``torch.distributed`` process group over which the plain (non-``DTensor``)
            tensors are split, each rank holding a disjoint piece (FSDP1 flat shards): their norms
            are then reduced over it like a DTensor's. Every rank must pass the same number of
            tensors in the same order, an empty tensor for a piece it does not hold. ``None``:
            plain tensors are whole.

    Returns:
        A 1-D float32 tensor (float64 if any input is float64 or complex128) with one norm per
        (non-``None``) tensor, in input order; empty for no tensors. A complex tensor's norm is that
        of its entries' moduli, as ``torch.linalg.vector_norm`` and ``get_total_norm`` take it. For
        a ``DTensor`` sharded over a device mesh, the norm of the full tensor, reduced across the
        ranks that hold its shards (one collective for all such tensors) and the same on every rank;
        the result is a plain tensor on the local device. A tensor holding inf has norm inf, one
        holding NaN norm NaN.

    Raises:
        ValueError: for a ``DTensor`` with a ``Partial`` placement (see :func:`shard_groups`).
    """
    tensors = as_tensor_list(tensors)
    norm_type = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    keys: Optional[list[Any]] = None
    if shard_group is not None or has_dtensor(tensors):
        keys = [shard_groups(t, () if shard_group is None else (shard_group,)) for t in tensors]
        tensors = [local_tensor(t) for t in tensors]
    groups = group_by_device_and_dtype(tensors)
    if len(groups) == 1:  # the usual case: one device, one dtype
        ((device, dtype),) = groups
        out = group_norms(tensors, norm_type, device, dtype)
    else:
        out = [None] * len(tensors)
        for (device, dtype), idx in groups.items():
            for i, n in zip(idx, group_norms([tensors[i] for i in idx], norm_type, device, dtype)):
                out[i] = n.to(tensors[0].device)
    if keys is not None and any(keys):
        out = reduce_shard_norms(out, keys, norm_type)
    return torch.stack(out)


def group_norms(group: list[Tensor], norm_type: float, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """The norms of tensors of one device and dtype: one foreach call, accumulated in float32 (float64 kept;
    complex tensors give the real norm of their moduli, as ``torch.linalg.vector_norm``), 0 for an empty tensor."""
    acc = accumulation_dtype(dtype)
    if norm_type == math.inf and any(t.numel() == 0 for t in group):
        # the inf norm refuses an empty tensor (often a rank's share of a small sharded one): norm 0
        nonempty = [t for t in group if t.numel()]
        full = iter(group_norms(nonempty, norm_type, device, dtype) if nonempty else [])
        return [next(full) if t.numel() else torch.zeros((), dtype=acc.to_real(), device=device) for t in group]
    if device.type not in ("cpu", "cuda"):  # no foreach kernels (MPS, XLA...): one reduction per tensor
        return [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group]
    return list(torch._foreach_norm(group, norm_type, dtype=acc))


@torch.no_grad()
def combine_norms(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Total norm from per-tensor norms: ``(sum n_i^p)^(1/p)``, or ``max n_i`` for the inf-norm."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    return torch.linalg.vector_norm(norms, check_norm_type(norm_type))


@torch.no_grad()
def global_norm(tensors: Tensors, norm_type: float = 2.0, *, shard_group: Optional[Any] = None) -> Tensor:
    """The norm of all tensors viewed as one vector, as ``tf.linalg.global_norm`` (and any ``norm_type``).

    Args:
        tensors: a tensor or an iterable of tensors; ``None`` entries are skipped.
        norm_type: order of the norm, any positive float or ``inf``.
        shard_group: process group the plain tensors are sharded over (see :func:`tensor_norms`).

    Returns:
        A 0-dim float32 tensor (float64 for float64 or complex128 inputs); 0 for an empty list. Complex
        tensors count by their entries' moduli, as in ``torch.nn.utils.get_total_norm``.
    """
    return combine_norms(tensor_norms(tensors, norm_type, shard_group=shard_group), norm_type)


@torch.no_grad()
def subset_norms(norms: Tensor, members: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of each subset of the tensors, with no host read.

    Args:
        norms: 1-D per-tensor norms, as from :func:`tensor_norms`.
        members: 2-D bool tensor, one row per subset: ``members[s, i]`` if tensor ``i`` is in
            subset ``s``. Subsets may overlap (a row of all ``True`` gives the global norm); an
            empty subset has norm 0, and a non-finite norm reaches only the subsets holding it.
        norm_type: order of the norm the per-tensor norms were taken with.

    Returns:
        A 1-D tensor with one norm per row of ``members``: ``(sum n_i^p)^(1/p)`` over the
        subset, or ``max n_i`` for the inf-norm.
    """
    norm_type = check_norm_type(norm_type)
    if norm_type == float("inf"):
        return torch.where(members, norms, 0.0).amax(dim=1)
    return torch.where(members, norms.pow(norm_type), 0.0).sum(dim=1).pow(1.0 / norm_type)
