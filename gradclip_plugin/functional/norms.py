"""Gradient norms: per tensor, global and per group, from one fused pass.

Norms are accumulated in float32 (float64 for float64 tensors) whatever the tensor dtype, with
tensors grouped by (device, dtype) so that each group is one ``torch._foreach_norm`` call, as in
torch's ``torch.nn.utils.get_total_norm``. Nothing here reads a value back to the host.

Sharded tensors (``DTensor``, as FSDP2 and tensor parallelism store gradients) are measured as the
full tensors they are shards of: see :mod:`gradclip_plugin.functional.distributed`. Everything built
on :func:`tensor_norms` (global, per-group and per-tensor norms, the clipping coefficients) then holds
the full tensors' values, the same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.functional.distributed import (
    ambient_shard_group,
    is_dtensor,
    local_tensor,
    reduce_shard_norms,
    shard_groups,
)

Tensors = Union[Tensor, Iterable[Optional[Tensor]]]

__all__ = ["Tensors", "combine_norms", "global_norm", "segment_norms", "subset_norms", "tensor_norms"]


def as_tensor_list(tensors: Tensors) -> list[Tensor]:
    """Return ``tensors`` as a list, a single tensor wrapped and ``None`` entries dropped."""
    if isinstance(tensors, Tensor):
        return [tensors]
    return [t for t in tensors if t is not None]


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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in input order within a group."""
    # torch's own C++ grouping (what `clip_grad_norm_` uses): a few microseconds where a Python loop over
    # the tensors' `device` and `dtype` costs one Python object per tensor, every step
    grouped = torch._C._group_tensors_by_device_and_dtype([list(tensors)], True)
    return {key: indices for key, (_, indices) in grouped.items()}


def all_plain(tensors: list[Tensor], shard_group: Optional[Any] = None) -> bool:
    """Whether every tensor is whole and local: no ``DTensor``, and no ``shard_group`` splits them.

    The usual case (one process, DDP): callers then skip the per-tensor sharding logic.
    """
    return shard_group is None and not any(map(is_dtensor, tensors))


def _has_foreach(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


# torch's CPU norm kernels, asked for a float32 result from a half tensor, first cast a whole float32
# copy of it: for a large gradient that allocation-bound pass costs ~10x the reduction. torch's own
# half-precision kernel avoids it by rounding each norm to the tensor's dtype (2^-9 relative for
# bfloat16). Two routes keep float32 accuracy without the copy:
# * the 2-norm (by far the most used) comes from batch-norm statistics: with float32 running stats,
#   `batch_norm_update_stats` reads a half tensor once per row and returns each row's float32 mean and
#   population variance, and a row's sum of squares is L * (var + mean^2). Rows of _BN_ROW elements
#   (16 KiB of half floats, L1-resident for the kernel's second pass) are reduced in parallel, as fast as
#   torch's half-precision norm, and the row sums are added in float64: 1e-8..2e-7 relative error;
# * other orders cast chunk by chunk into one cache-sized scratch buffer, reduced by rows of _ROW.
# Short float32 partial sums are also more accurate than torch's one long sum (up to 8e-4 relative
# error on 2M elements, 2.6e-3 on 38.6M).
_BN_ROW = 1 << 13  # elements per row of the batch-norm statistics
_CHUNK = 1 << 21  # float32 elements of the scratch buffer (8 MiB)
_ROW = 1 << 10  # elements per partial norm; a multiple of it divides _CHUNK
_CHUNKED_MIN = 1 << 16  # smaller tensors are cast whole, in one foreach call


def _cpu_half_l2_norms(group: list[Tensor]) -> list[Tensor]:
    """float32 2-norms of CPU float16/bfloat16 tensors from per-row batch-norm statistics (no float32 copy)."""
    flats = [t.reshape(-1) for t in group]
    rows = [f.numel() // _BN_ROW for f in flats]
    stats = torch.empty(2, sum(rows), dtype=torch.float32)  # per row: mean, population variance
    running = torch.zeros(2, sum(rows), dtype=torch.float32)  # float32 running stats select the float32 kernel; never read
    r = 0
    for f, k in zip(flats, rows):
        if k:
            s = slice(r, r + k)
            torch.ops.aten.batch_norm_update_stats.out(
                f[: k * _BN_ROW].view(1, k, _BN_ROW), running[0, s], running[1, s], 0.0, out0=stats[0, s], out1=stats[1, s]
            )
            r += k
    mean, var = stats.double()
    # a row holding +inf or -inf (and no NaN) has an infinite mean and a NaN variance: its norm is inf
    row_squares = torch.where(mean.isinf(), math.inf, (var + mean.square()) * _BN_ROW)
    body = torch.segment_reduce(row_squares, "sum", lengths=torch.tensor(rows))
    # what is left of each tensor (fewer than _BN_ROW elements; all of a small one) is summed in float64
    tails = [f[k * _BN_ROW :] for f, k in zip(flats, rows)]
    tail = torch.segment_reduce(torch.cat(tails).double().square(), "sum", lengths=torch.tensor([t.numel() for t in tails]))
    return list((body + tail).sqrt().float().unbind())


def _cpu_half_norms(group: list[Tensor], norm_type: float) -> list[Tensor]:
    """float32 ``norm_type``-norms of CPU float16/bfloat16 tensors, with no float32 copy of a large one."""
    if norm_type == 2.0:
        return _cpu_half_l2_norms(group)
    large = [t.numel() >= _CHUNKED_MIN for t in group]
    small = [t for t, is_large in zip(group, large) if not is_large]
    small_norms = iter(torch._foreach_norm(small, norm_type, dtype=torch.float32) if small else [])
    rows_per_tensor = [-(-t.numel() // _ROW) for t, is_large in zip(group, large) if is_large]
    rows = torch.empty(sum(rows_per_tensor), dtype=torch.float32)
    # as large as the largest chunk needs: a 64K-element gradient does not fault in 8 MiB every step
    scratch = torch.empty(min(_CHUNK, max(rows_per_tensor, default=0) * _ROW), dtype=torch.float32)
    r = 0
    for t in (t for t, is_large in zip(group, large) if is_large):
        for chunk in t.reshape(-1).split(_CHUNK):
            n = chunk.numel()
            k = -(-n // _ROW)
            buf = scratch[: k * _ROW]
            buf[:n].copy_(chunk)
            buf[n:].zero_()  # pads the last row: a zero adds nothing to any p-norm (or the max)
            torch.linalg.vector_norm(buf.view(k, _ROW), norm_type, dim=1, out=rows[r : r + k])
            r += k
    # the few row norms (1 per _ROW elements) are combined in float64: no long float32 sum anywhere
    large_norms = iter(
        torch.linalg.vector_norm(seg, norm_type, dtype=torch.float64).float() for seg in rows.split(rows_per_tensor)
    )
    return [next(large_norms) if is_large else next(small_norms) for is_large in large]


@torch.no_grad()
def tensor_norms(tensors: Tensors, norm_type: float = 2.0, *, shard_group: Optional[Any] = None) -> Tensor:
    """The ``norm_type``-norm of each tensor, as a 1-D float32 tensor on the first tensor's device.

    Args:
        tensors: a tensor or an iterable of tensors; ``None`` entries are skipped.
        norm_type: order of the norm, any positive float or ``inf``.
        shard_group: a ``torch.distributed`` process group over which the plain (non-``DTensor``)
            tensors are split, each rank holding a disjoint piece (FSDP1 flat shards): their norms
            are then reduced over it like a DTensor's. Every rank must pass the same number of
            tensors in the same order, an empty tensor for a piece it does not hold. ``None``:
            the group of an enclosing :func:`~gradclip_plugin.functional.distributed.sharded_over`
            block if any, else plain tensors are whole.

    Returns:
        A 1-D tensor with one norm per (non-``None``) tensor, in input order; empty for no tensors.
        For a ``DTensor`` sharded over a device mesh, the norm of the full tensor, reduced across
        the ranks that hold its shards (one collective for all such tensors) and the same on
        every rank; the result is a plain tensor on the local device. A tensor holding inf has
        norm inf, and one holding NaN has norm NaN, except one corner: a CPU float16/bfloat16
        tensor whose ``+inf`` and ``-inf`` fall in the same row of 8192 elements (and no NaN) has
        2-norm NaN (its row statistics are NaN). Both are non-finite to every caller here. Where
        squares overflow float32 (entries past ~1.8e19) a norm is inf, as torch's float32
        accumulation gives, except such a CPU half-precision row of near-equal entries, whose
        variance does not overflow: its finite (true) norm is returned.

    Raises:
        ValueError: for a ``DTensor`` with a ``Partial`` placement (see :func:`shard_groups`).
    """
    tensors = as_tensor_list(tensors)
    norm_type = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    if shard_group is None:
        shard_group = ambient_shard_group()
    keys: Optional[list[Any]] = None
    if not all_plain(tensors, shard_group):
        plain_key = () if shard_group is None else (shard_group,)
        keys = [shard_groups(t, plain_key) for t in tensors]
        tensors = [local_tensor(t) for t in tensors]
    first_device = tensors[0].device
    out: list[Optional[Tensor]] = [None] * len(tensors)
    groups = group_by_device_and_dtype(tensors)
    for (device, dtype), idx in groups.items():
        acc = accumulation_dtype(dtype)
        # An empty tensor (often a rank's share of a small sharded one) has norm 0 for every
        # order; the inf-norm kernels refuse it ("no identity"), so it is left out of the call.
        empty = [i for i in idx if tensors[i].numel() == 0]
        for i in empty:
            out[i] = torch.zeros((), dtype=acc, device=device)
        if empty:
            idx = [i for i in idx if out[i] is None]
        group = [tensors[i] for i in idx]
        if not group:
            continue
        if _has_foreach(device) and norm_type == float("inf") and dtype == torch.bfloat16:
            # max |x| is exact in the tensor's own dtype, and bfloat16 has float32's range; asking for
            # a float32 result would make torch's CPU kernel cast a float32 copy of every tensor first.
            norms = [n.float() for n in torch._foreach_norm(group, norm_type)]
        elif device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            norms = _cpu_half_norms(group, norm_type)
        elif _has_foreach(device):
            norms = torch._foreach_norm(group, norm_type, dtype=acc)
        else:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group]
        for i, n in zip(idx, norms):
            out[i] = n
    if keys is not None and any(keys):
        out = reduce_shard_norms(out, keys, norm_type)  # type: ignore[arg-type]
    # the usual case, one device: no per-tensor `.to` (it costs a dispatch per tensor every step)
    one_device = len({device for device, _ in groups}) == 1
    result = torch.stack(out if one_device else [n.to(first_device) for n in out])  # type: ignore[union-attr,arg-type]
    return result if result.dtype == torch.float64 else result.float()


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
        A 0-dim float32 tensor (float64 for float64 inputs); 0 for an empty list.
    """
    return combine_norms(tensor_norms(tensors, norm_type, shard_group=shard_group), norm_type)


@torch.no_grad()
def segment_norms(norms: Tensor, segment_ids: Tensor, num_segments: int, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into one norm per segment (group of tensors), with no host read.

    Args:
        norms: 1-D per-tensor norms, as from :func:`tensor_norms`.
        segment_ids: 1-D int64 tensor, the segment of each norm, on ``norms``' device.
        num_segments: number of segments; a segment with no tensor has norm 0.
        norm_type: order of the norm the per-tensor norms were taken with.

    Returns:
        A 1-D tensor of ``num_segments`` norms.
    """
    segments = torch.arange(num_segments, device=segment_ids.device)
    return subset_norms(norms, segments[:, None] == segment_ids[None, :], norm_type)


@torch.no_grad()
def subset_norms(norms: Tensor, members: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of each subset of the tensors, with no host read.

    Args:
        norms: 1-D per-tensor norms, as from :func:`tensor_norms`.
        members: 2-D bool tensor, one row per subset: ``members[s, i]`` if tensor ``i`` is in
            subset ``s``. Subsets may overlap (a row of all ``True`` gives the global norm); an
            empty subset has norm 0, and a non-finite norm reaches only the subsets holding it.

    Returns:
        A 1-D tensor with one norm per row of ``members``: ``(sum n_i^p)^(1/p)`` over the
        subset, or ``max n_i`` for the inf-norm.
    """
    norm_type = check_norm_type(norm_type)
    if norm_type == float("inf"):
        return torch.where(members, norms, 0.0).amax(dim=1)
    powered = norms.square() if norm_type == 2.0 else norms.pow(norm_type)
    total = torch.where(members, powered, 0.0).sum(dim=1)
    return total.sqrt() if norm_type == 2.0 else total.pow(1.0 / norm_type)
