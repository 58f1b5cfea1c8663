"""Norms of sharded tensors: each rank's shard measured locally, partial results reduced once.

A gradient stored as a ``torch.distributed.tensor.DTensor`` (FSDP2 ``fully_shard``, tensor
parallelism, Lightning's ``ModelParallelStrategy``) holds on each rank only its shard. Its norm is
that of the full tensor: every rank takes the ``p``-th power sum of its shard, the sums are added
across the mesh dimensions the tensor is sharded over, and the ``1/p`` root is taken (for the
inf-norm: the maximum of the shard maxima). Mesh dimensions the tensor is replicated over are not
reduced, so a replicated tensor is counted once. All sharded tensors with the same shard groups
share one collective, and every rank ends with the same values, so decisions that follow from
them (skip a non-finite step, clip or not) agree across ranks.

Torch only: ``torch.distributed`` is imported lazily, and a build without it sees no DTensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["has_dtensor", "is_dtensor", "local_tensor", "reduce_shard_norms", "shard_groups"]

ShardKey = tuple[Any, ...]  # the process groups of the mesh dims a tensor is sharded over; () if none


def _dtensor_type() -> Any:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def has_dtensor(tensors: Sequence[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor: one check per distinct type, not per tensor (the hot path)."""
    return _DTENSOR is not None and any(issubclass(k, _DTENSOR) for k in set(map(type, tensors)))


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage, so in-place ops reach it); ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def shard_groups(t: Tensor, plain: ShardKey = ()) -> ShardKey:
    """The process groups of the mesh dimensions over which ``t`` is sharded, in mesh order.

    ``()`` for a DTensor replicated on every mesh dimension: its local norm is already the norm
    of the full tensor. A plain tensor gets ``plain``: ``()`` when it is whole, ``(group,)`` when
    it is this rank's piece of a tensor split over ``group`` (FSDP1 flat shards).

    Raises:
        ValueError: for a DTensor with a ``Partial`` placement (pending sum): its full values, hence
            its norm, are not known before the reduction; redistribute it first.
    """
    if not is_dtensor(t):
        return plain
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError(f"cannot take the norm of a DTensor with a Partial placement {tuple(t.placements)}: its entries "
                             "are pending sums across ranks. Call `.redistribute(placements=[Replicate()])` first.")
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(dim))
    return tuple(groups)


@torch.no_grad()
def reduce_shard_norms(norms: Sequence[Tensor], keys: Sequence[ShardKey], norm_type: float) -> list[Tensor]:
    """Turn per-shard norms into norms of the full tensors, with one all-reduce per shard key.

    Args:
        norms: 0-dim norm of each rank-local shard, in float32 or float64.
        keys: :func:`shard_groups` of each tensor; ``()`` leaves its norm as it is.
        norm_type: order of the norms, positive or ``inf``.

    Returns:
        The norms of the full tensors, same order, dtype and devices as ``norms``. Every rank
        gets the same values, NaN included (a NaN on any rank makes the norm NaN on all).
    """
    out = list(norms)
    by_key: dict[ShardKey, list[int]] = {}
    for i, key in enumerate(keys):
        if key:
            by_key.setdefault(key, []).append(i)
    for key, idx in by_key.items():
        part = torch.stack([out[i] for i in idx])
        if norm_type == float("inf"):
            # Gloo's MAX drops a NaN met second (max(1, nan) = 1), so NaN travels as a flag.
            nan = torch.isnan(part)
            buf = torch.cat([part.masked_fill(nan, float("inf")), nan.to(part.dtype)])
            for group in key:
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=group)
            n = len(idx)
            reduced = buf[:n].masked_fill(buf[n:] > 0, float("nan"))
        else:
            buf = part.pow(norm_type)
            for group in key:
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)
            reduced = buf.pow(1.0 / norm_type)
        for i, value in zip(idx, reduced.unbind()):
            out[i] = value.to(out[i].dtype)
    return out
