"""Adaptive clipping rules: AGC's unit-wise limits, AutoClip's percentile of past norms, ZClip's z-score.

AGC (Brock et al. 2021) is stateless: each unit (output row of a weight) is clipped relative to the
norm of the weight itself. AutoClip (Seetharaman et al. 2020) and ZClip (Kumar et al. 2025) keep a
small state of past gradient norms; here that state is a ``NamedTuple`` of device tensors (plus host
integers that the caller knows without reading a tensor), and each step is one pure function
``update(state, norm) -> (state, threshold, ...)`` built from ``torch.where``, so that:

* nothing is read back to the host (no ``.item()``, no Python ``if`` on a tensor);
* a non-finite norm (inf or NaN) never enters the state: the update keeps the old values, so the
  statistics stay finite whatever the caller does with the step;
* the state can be saved and restored (``state._asdict()``) and the run continues exactly.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.functional.distributed import is_dtensor
from gradclip_plugin.functional.norms import Tensors, accumulation_dtype, as_tensor_list, check_norm_type

__all__ = [
    "AutoClipState",
    "ZClipState",
    "adaptive_clip_grad_",
    "agc_coefficients",
    "autoclip_init",
    "autoclip_update",
    "threshold_coefficient",
    "scale_units_",
    "unit_counts",
    "unitwise_norm",
    "unitwise_norms",
    "zclip_init",
    "zclip_update",
]

#: a Python float (a value the host holds) or a 0-dim tensor (one that stays on the device)
Value = Union[float, Tensor]
ZClipMode = Literal["zscore", "percentile"]
ZClipOption = Literal["adaptive_scaling", "mean"]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


# ---------------------------------------------------------------------------------------------- AGC
@torch.no_grad()
def unitwise_norm(x: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of each unit of ``x``, shaped as timm's ``unitwise_norm``.

    A unit is a slice along the first (output) dimension, as PyTorch stores ``Linear`` and
    ``ConvNd`` weights; a tensor of one dimension or less (a bias, a gain) is one unit. Accumulated
    in float32 (float64 for float64 inputs).

    Returns:
        A 0-dim tensor for ``x.dim() <= 1``, else a tensor of shape ``(x.shape[0], 1, ..., 1)``.

    References:
        Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization";
        timm ``timm/utils/agc.py``.
    """
    norm_type = check_norm_type(norm_type)
    acc = accumulation_dtype(x.dtype)
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, norm_type, dtype=acc)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.dim())), keepdim=True, dtype=acc)


def unit_counts(tensors: Tensors) -> list[int]:
    """Number of units of each tensor: ``t.shape[0]`` for two or more dimensions, else 1 (host shapes only)."""
    return [t.shape[0] if t.dim() > 1 else 1 for t in as_tensor_list(tensors)]


@torch.no_grad()
def unitwise_norms(tensors: Tensors, norm_type: float = 2.0) -> Tensor:
    """Unit-wise norms of all tensors, concatenated into one 1-D tensor on the first tensor's device.

    Tensor ``i`` contributes ``unit_counts(tensors)[i]`` entries, in order. Tensors of one dimension
    or less are grouped by (device, dtype) into one ``torch._foreach_norm`` call; each tensor of two
    or more dimensions is one ``vector_norm`` over its flattened trailing dimensions. Nothing is read
    back to the host.

    Returns:
        A 1-D float32 tensor (float64 if every tensor is float64); empty for no tensors.

    Raises:
        ValueError: for a ``DTensor`` (sharded) input.
    """
    tensors = as_tensor_list(tensors)
    norm_type = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0)
    if any(is_dtensor(t) for t in tensors):
        raise ValueError(
            "unit-wise norms of sharded (DTensor) tensors are not supported: a unit split across ranks "
            "would be measured by its local piece. Use global-norm clipping (ClipByGlobalNorm, AutoClip, "
            "ZClip), which reduces the norms of sharded gradients across ranks."
        )
    first = tensors[0].device
    parts: list[Optional[Tensor]] = [None] * len(tensors)
    small: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dim() <= 1:
            small.setdefault((t.device, t.dtype), []).append(i)
        else:
            parts[i] = torch.linalg.vector_norm(t.flatten(1), norm_type, dim=1, dtype=accumulation_dtype(t.dtype))
    for (device, dtype), idx in small.items():
        group = [tensors[i] for i in idx]
        acc = accumulation_dtype(dtype)
        if device.type in ("cpu", "cuda"):
            norms = torch._foreach_norm(group, norm_type, dtype=acc)
        else:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in group]
        for i, n in zip(idx, norms):
            parts[i] = n.reshape(1)
    dtype = torch.float64 if all(p.dtype == torch.float64 for p in parts) else torch.float32  # type: ignore[union-attr]
    return torch.cat([p.to(device=first, dtype=dtype) for p in parts])  # type: ignore[union-attr]


@torch.no_grad()
def agc_coefficients(
    grad_norms: Tensor, param_norms: Tensor, clip_factor: float = 0.01, eps: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """AGC's scale per unit: ``limit / ||G_u||`` where ``||G_u|| > limit``, else exactly 1.

    ``limit = clip_factor * max(||W_u||, eps)``: a zero-initialised unit (a bias at 0) gets
    ``clip_factor * eps``, never 0. Since ``limit > 0``, a clipped unit has a positive norm and the
    division is safe: the unit is scaled exactly to the limit (timm and the DeepMind reference
    divide by ``max(||G_u||, 1e-6)``, which differs only where ``clip_factor * eps < 1e-6``).

    Args:
        grad_norms: unit-wise gradient norms, as from :func:`unitwise_norms`.
        param_norms: unit-wise parameter norms, same layout.
        clip_factor: the ratio ``||G_u|| / ||W_u||`` allowed (the paper's lambda).
        eps: floor on the parameter norm.

    Returns:
        ``(coefficients, limits)``, both shaped like ``grad_norms``.

    References:
        Brock et al. 2021 (NFNets), Section 4.1; timm ``adaptive_clip_grad``.
    """
    _check_positive("clip_factor", clip_factor)
    _check_positive("eps", eps)
    limits = param_norms.to(grad_norms.device, grad_norms.dtype).clamp_min(eps).mul_(clip_factor)
    coefs = torch.where(grad_norms > limits, limits / grad_norms, torch.ones_like(grad_norms))
    return coefs, limits


@torch.no_grad()
def scale_units_(tensors: Tensors, coefs: Tensor) -> None:
    """Multiply each unit of each tensor in place by its entry of ``coefs`` (layout of :func:`unitwise_norms`)."""
    tensors = as_tensor_list(tensors)
    if not tensors:
        return
    counts = unit_counts(tensors)
    if coefs.numel() != sum(counts):
        raise ValueError(f"`coefs` must hold one entry per unit ({sum(counts)}), got {coefs.numel()}")
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for t, c in zip(tensors, coefs.split(counts)):
        shape = (t.shape[0],) + (1,) * (t.dim() - 1) if t.dim() > 1 else ()
        ts, cs = groups.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        cs.append(c.to(t.device).reshape(shape))
    for (_, dtype), (ts, cs) in groups.items():
        if dtype in (torch.float16, torch.bfloat16):
            # a coefficient cast to float16 first can round to a subnormal (or 0) and miss the limit
            for t, c in zip(ts, cs):
                t.copy_(t.float().mul_(c))
        else:
            torch._foreach_mul_(ts, [c.to(dtype) for c in cs])


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Union[Tensor, Iterable[Tensor]], clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0
) -> Tensor:
    """Unit-wise adaptive gradient clipping of ``p.grad`` in place, as timm's ``adaptive_clip_grad``.

    Each unit ``G_u`` of a gradient is scaled to ``clip_factor * max(||W_u||, eps)`` where its norm
    exceeds that limit (see :func:`agc_coefficients`).

    Args:
        parameters: a parameter or an iterable of parameters; those without ``.grad`` are skipped.
        clip_factor: the allowed ratio of gradient to parameter norm, per unit.
        eps: floor on the parameter norm (so zero-initialised parameters can still move).
        norm_type: order of the unit-wise norms.

    Returns:
        The pre-clip norm of all gradients together, a 0-dim tensor.

    References:
        Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization".
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    grad_norms = unitwise_norms(grads, norm_type)
    coefs, _ = agc_coefficients(grad_norms, unitwise_norms(params, norm_type), clip_factor, eps)
    scale_units_(grads, coefs)
    if grad_norms.numel() == 0:
        return torch.zeros(())
    return torch.linalg.vector_norm(grad_norms, check_norm_type(norm_type))


@torch.no_grad()
def threshold_coefficient(threshold: Value, norm: Value) -> Value:
    """``threshold / norm`` where ``norm > threshold``, else exactly 1 (for Python floats too).

    Unlike ``min(1, threshold / norm)`` this is never NaN for a finite norm: an adaptive threshold
    can be 0 (a history of zero gradients) and ``0 / 0`` would poison the gradients. A NaN norm
    gives 1 (the gradients are already NaN and the non-finite policy decides their fate).
    """
    if isinstance(norm, float):
        return threshold / norm if norm > threshold else 1.0
    return torch.where(norm > threshold, threshold / norm, 1.0)


# Where an update runs. On the device, the state is tensors and the norm a 0-dim tensor: nothing is
# read back (the form for GPU training without a host read per step). On the host, the state is Python
# numbers and the norm a Python float the caller has read anyway (say, to decide whether to skip a
# non-finite step): float64 arithmetic, no kernel at all, the reference implementations' very numbers.
# The arithmetic below is written once for both. A condition is a Python bool where the host knows it
# and a bool 0-dim tensor where only the device does; the updates branch in Python on the first and
# select with `torch.where` on the second, with the same result either way.
Flag = Union[bool, Tensor]


def _select(cond: Flag, a: Value, b: Value) -> Value:
    """``torch.where(cond, a, b)``, or ``a`` or ``b`` itself when the host knows ``cond``."""
    if isinstance(cond, bool):
        return a if cond else b
    return torch.where(cond, a, b)


def _not(cond: Flag) -> Flag:
    return (not cond) if isinstance(cond, bool) else ~cond


def _add_flag(count: Union[int, Tensor], flag: Flag) -> Union[int, Tensor]:
    """``count + flag``: a host integer while both are known on the host, else an int64 tensor."""
    return count + (flag if isinstance(flag, bool) else flag.to(torch.int64))


def _sqrt(x: Value) -> Value:
    return x**0.5 if isinstance(x, float) else x.sqrt()  # the references' `var ** 0.5`


def _square(x: Value) -> Value:
    return x**2 if isinstance(x, float) else x.square()


def _at_most(x: Value, cap: Optional[float]) -> Value:
    """``min(x, cap)`` keeping NaN (``clamp``'s rule); ``x`` if ``cap`` is ``None``."""
    if cap is None:
        return x
    if isinstance(x, float):
        return cap if x > cap else x
    return x.clamp(max=cap)


def _constant(like: Value, value: float) -> Value:
    return value if isinstance(like, float) else torch.full_like(like, value)


def _host_norm(norm: Union[Value, int]) -> Value:
    """A Python number as a float (the host form), a tensor as it is."""
    if isinstance(norm, Tensor):
        return norm
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise TypeError(f"`norm` must be a 0-dim tensor or a Python float, got {norm!r}")
    return float(norm)


def _finite_flag(norm: Value, finite: Optional[Flag]) -> Flag:
    if finite is None:
        return math.isfinite(norm) if isinstance(norm, float) else torch.isfinite(norm)
    if not isinstance(finite, (bool, Tensor)) or (isinstance(norm, float) and not isinstance(finite, bool)):
        raise TypeError(f"`finite` must be None, a bool or (for a tensor norm) a bool tensor, got {finite!r}")
    return finite


def _check_form(state: Any, norm: Value) -> None:
    if isinstance(norm, float) != state.on_host:
        have, want = ("a Python float", "to_host()") if isinstance(norm, float) else ("a tensor", "to_device(device)")
        raise TypeError(
            f"`norm` is {have} but the {type(state).__name__} is on the "
            f"{'device' if isinstance(norm, float) else 'host'}: convert it once with `state.{want}`"
        )


def _to_host(value: Any) -> Any:
    """A tensor as Python numbers (a 1-D one as a tuple); anything else as it is."""
    if not isinstance(value, Tensor):
        return value
    return tuple(value.tolist()) if value.dim() else value.item()


# ---------------------------------------------------------------------------------------------- AutoClip
class AutoClipState(NamedTuple):
    """AutoClip's history of pre-clip gradient norms.

    With ``history_size`` given, ``history`` is a ring buffer in arrival order (sorted at each
    step to take the percentile, ``history_size`` entries). With ``history_size=None`` it is kept
    sorted, each norm inserted at its rank (no sort: a few element-wise passes), and doubles when
    full. Unused slots hold ``+inf``, so the recorded norms always rank first. ``steps`` counts
    update calls, finite or not: a host integer, known without a read, that bounds ``count`` and
    decides when the buffer must grow. On the host (see :func:`autoclip_init`) ``history`` is a
    tuple of floats in the same layout.
    """

    history: Union[Tensor, tuple[float, ...]]  #: recorded norms (ring, or sorted if unbounded), ``+inf`` in unused slots
    #: finite norms recorded so far (all time): a host integer while the host knew every update's
    #: finiteness, else a 0-dim int64 tensor
    count: Union[int, Tensor]
    steps: int  #: update calls so far (host integer)

    @property
    def on_host(self) -> bool:
        return isinstance(self.history, tuple)

    def to_host(self) -> AutoClipState:
        """This state as Python numbers (reads the tensors back once, e.g. when a resumed run reads its norms)."""
        return AutoClipState(_to_host(self.history), _to_host(self.count), self.steps)

    def to_device(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> AutoClipState:
        """This state as tensors on ``device`` (the history in ``dtype``; a host count stays a host integer).
        A copy from the host: once, e.g. when a resumed run gets a loss scaler."""
        count = self.count.to(device) if isinstance(self.count, Tensor) else self.count
        return AutoClipState(torch.as_tensor(self.history, dtype=dtype, device=device), count, self.steps)


def _check_history_size(history_size: Optional[int]) -> None:
    bad = isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
    if history_size is not None and bad:
        raise ValueError(f"`history_size` must be a positive integer or None (keep every norm), got {history_size!r}")


def _check_percentile(percentile: float) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be a number in [0, 100], got {percentile!r}")


def autoclip_init(
    history_size: Optional[int] = None,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    capacity: int = 64,
    on_host: bool = False,
) -> AutoClipState:
    """An empty AutoClip state: ``history_size`` slots, or ``capacity`` (growing) if ``None``.

    ``on_host=True``: Python floats, for updates with a ``norm`` the caller has read (``device`` and
    ``dtype`` are then unused).
    """
    _check_history_size(history_size)
    size = history_size if history_size is not None else capacity
    if on_host:
        return AutoClipState(history=(math.inf,) * size, count=0, steps=0)
    return AutoClipState(torch.full((size,), math.inf, device=device, dtype=dtype), 0, 0)  # fill kernels, no copy


def _percentile(ranked: Any, n: Union[int, Tensor], percentile: float) -> Value:
    """The ``percentile`` of the ``n`` smallest entries of the sorted ``ranked``, interpolated linearly at
    position ``(n - 1) * percentile / 100`` (in float64) as ``numpy.percentile``; ``ranked[0]`` (+inf) if ``n`` is 0."""
    if isinstance(n, int):
        last = max(n - 1, 0)
        position = last * (percentile / 100.0)
        lo = math.floor(position)
        hi, frac = min(lo + 1, last), position - lo
        a, b = ranked[lo], ranked[hi]
        # torch rounds the Python float `frac` to a tensor's dtype, as `frac.to(a.dtype)` below
        return a if hi == lo or frac == 0.0 else a + frac * (b - a)
    last = (n - 1).clamp(min=0)
    wide = torch.float32 if ranked.device.type == "mps" else torch.float64  # MPS has no float64
    position = last.to(wide) * (percentile / 100.0)
    lo = position.floor()
    frac = (position - lo).to(ranked.dtype)
    lo_i = lo.to(torch.int64).reshape(1)
    hi_i = torch.minimum(lo_i + 1, last.reshape(1))
    a, b = ranked.gather(0, lo_i).squeeze(0), ranked.gather(0, hi_i).squeeze(0)
    return torch.where(a == b, a, a + frac * (b - a))  # a == b == inf: an empty history


@torch.no_grad()
def autoclip_update(
    state: AutoClipState,
    norm: Value,
    percentile: float = 10.0,
    history_size: Optional[int] = None,
    *,
    finite: Optional[Flag] = None,
) -> tuple[AutoClipState, Value]:
    """Record ``norm`` and return the clipping threshold: the ``percentile``-th percentile of the history.

    The history includes this step's norm (the paper's order: append, then take the percentile),
    restricted to the ``history_size`` most recent finite norms (all of them if ``None``). The
    percentile interpolates linearly between the closest ranks, as ``numpy.percentile`` and
    ``torch.quantile``: with ``n`` norms sorted ``s``, position ``(n - 1) * percentile / 100``.
    A non-finite ``norm`` is not recorded; the threshold is then the percentile of the history so
    far (``+inf`` if empty).

    Args:
        state: from :func:`autoclip_init` or a previous update.
        norm: this step's pre-clip global gradient norm: a 0-dim tensor (the state on the device,
            nothing read back), or a Python float with a state on the host (float64, no kernel).
        percentile: in [0, 100].
        history_size: as given to :func:`autoclip_init`.
        finite: whether to record ``norm``, if the caller knows it on the host (``True``/``False``):
            the update then runs fewer kernels, with the same result. ``None`` (default): whether
            ``norm`` is finite, checked where the norm is.

    Returns:
        ``(new_state, threshold)``, the threshold a 0-dim tensor of the history's dtype (a float on the host).

    References:
        Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks" (github.com/pseeth/autoclip).
    """
    _check_percentile(percentile)
    _check_history_size(history_size)
    norm = _host_norm(norm)
    _check_form(state, norm)
    history = state.history
    if history_size is not None and len(history) != history_size:
        raise ValueError(
            f"`history_size` is {history_size} but the state holds {len(history)} slots; "
            "pass the `history_size` the state was created with"
        )
    if history_size is None and state.steps >= len(history):  # host integers: grow by doubling
        history = history + (math.inf,) * len(history) if state.on_host else torch.cat(
            [history, torch.full_like(history, math.inf)]
        )
    capacity = len(history)
    if not state.on_host:
        norm = norm.to(device=history.device, dtype=history.dtype)
    finite = _finite_flag(norm, finite)
    count = state.count
    if history_size is None:  # sorted: insert at the norm's rank (count < capacity, the last slot is free)
        if finite is False:
            pass
        elif state.on_host:
            rank = bisect.bisect_left(history, norm)
            history = history[:rank] + (norm,) + history[rank:-1]
        else:
            value = _select(finite, norm, torch.full_like(norm, math.inf))  # inf lands among the free slots
            rank_of_value = torch.searchsorted(history, value.reshape(1))
            slot = torch.arange(capacity, device=history.device)
            shifted = torch.where(slot == rank_of_value, value, history.roll(1))
            history = torch.where(slot < rank_of_value, history, shifted)
        ranked = history
    else:  # ring buffer in arrival order: overwrite the oldest
        if finite is False:
            pass
        elif state.on_host:
            pos = count % capacity
            history = history[:pos] + (norm,) + history[pos + 1 :]
        elif isinstance(count, int):
            pos = count % capacity
            history = history.clone()
            history[pos] = _select(finite, norm, history[pos])
        else:
            pos_t = (count % capacity).reshape(1)
            value = _select(finite, norm, history.gather(0, pos_t).squeeze(0))
            history = history.scatter(0, pos_t, value.reshape(1))
        ranked = tuple(sorted(history)) if state.on_host else torch.sort(history).values
    count = _add_flag(count, finite)
    n = min(count, capacity) if isinstance(count, int) else count.clamp(max=capacity)
    return AutoClipState(history, count, state.steps + 1), _percentile(ranked, n, percentile)


# ---------------------------------------------------------------------------------------------- ZClip
class ZClipState(NamedTuple):
    """ZClip's warm-up buffer and exponential moving statistics of the gradient norm (tensors on the
    device, or Python numbers on the host, the buffer a tuple: see :func:`zclip_init`)."""

    buffer: Union[Tensor, tuple[float, ...]]  #: ``warmup_steps`` slots: the norms collected during warm-up
    #: finite norms seen so far (warm-up ends when it reaches ``warmup_steps``): a host integer while
    #: the host knew every update's finiteness, else a 0-dim int64 tensor
    count: Union[int, Tensor]
    mean: Value  #: EMA of the norm (0 until warm-up ends)
    var: Value  #: EMA of the squared deviation (0 until warm-up ends)
    spikes: Union[int, Tensor]  #: steps detected as spikes so far (int64)

    @property
    def on_host(self) -> bool:
        return not isinstance(self.mean, Tensor)

    def to_host(self) -> ZClipState:
        """This state as Python numbers (reads the tensors back once, e.g. when a resumed run reads its norms)."""
        return ZClipState(*(_to_host(v) for v in self))

    def to_device(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> ZClipState:
        """This state as tensors on ``device`` (floats in ``dtype``; a host count stays a host integer).
        A copy from the host: once, e.g. when a resumed run gets a loss scaler."""
        buffer, mean, var = (torch.as_tensor(v, dtype=dtype, device=device) for v in (self.buffer, self.mean, self.var))
        count = self.count.to(device) if isinstance(self.count, Tensor) else self.count
        return ZClipState(buffer, count, mean, var, torch.as_tensor(self.spikes, dtype=torch.int64, device=device))


def zclip_init(
    warmup_steps: int = 25,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    on_host: bool = False,
) -> ZClipState:
    """A fresh ZClip state with ``warmup_steps`` warm-up slots.

    ``on_host=True``: Python numbers, for updates with a ``norm`` the caller has read (``device`` and
    ``dtype`` are then unused).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"`warmup_steps` must be a positive integer, got {warmup_steps!r}")
    if on_host:
        return ZClipState((0.0,) * warmup_steps, 0, 0.0, 0.0, 0)
    zero = torch.zeros((), device=device, dtype=dtype)  # fill kernels: no host-to-device copy (a sync on CUDA)
    spikes = torch.zeros((), device=device, dtype=torch.int64)
    return ZClipState(torch.zeros(warmup_steps, device=device, dtype=dtype), 0, zero, zero.clone(), spikes)


def _zclip_collect(
    state: ZClipState, norm: Value, counts: Flag, max_norm: Optional[float]
) -> tuple[ZClipState, Value, Value, Flag]:
    """Warm-up: record ``norm`` where ``counts``; when the buffer fills, start the EMA at its mean and
    population variance. The threshold is ``max_norm`` (``+inf`` if ``None``), ``z`` 0, no spike."""
    buffer, count, mean, var, spikes = state
    n = len(buffer)
    if counts is False:
        pass
    elif state.on_host:  # count < n: still warming up
        buffer = buffer[:count] + (norm,) + buffer[count + 1 :]
    elif isinstance(count, int):  # the host knows the slot
        buffer = buffer.clone()
        buffer[count] = _select(counts, norm, buffer[count])
    else:
        pos = count.clamp(max=n - 1).reshape(1)
        buffer = buffer.scatter(0, pos, _select(counts, norm, buffer.gather(0, pos).squeeze(0)).reshape(1))
    count = _add_flag(count, counts)
    init = counts & (count == n)
    if init is not False:
        if state.on_host:  # the reference's sums, in its order
            init_mean = sum(buffer) / n
            init_var = sum((x - init_mean) ** 2 for x in buffer) / n
        else:
            init_mean = buffer.mean()
            init_var = (buffer - init_mean).square().mean()
        mean, var = _select(init, init_mean, mean), _select(init, init_var, var)
    threshold = _constant(norm, math.inf if max_norm is None else max_norm)
    no_spike = False if state.on_host else torch.zeros_like(norm, dtype=torch.bool)
    return ZClipState(buffer, count, mean, var, spikes), threshold, _constant(norm, 0.0), no_spike


def _zclip_track(state: ZClipState, norm: Value, counts: Flag, alpha: float, z_thresh: float,
                 max_norm: Optional[float], eps: float, mode: str, clip_option: str, clip_factor: float,
                 skip_update_on_spike: bool) -> tuple[ZClipState, Value, Value, Flag]:  # fmt: skip
    """After warm-up: z-score, spike, clip value and threshold; the EMA takes the norm where ``counts``.
    A norm that does not count has z-score NaN: it is not a sample of the statistics."""
    buffer, count, mean, var, spikes = state
    std = _sqrt(var)
    z = (norm - mean) / (std + eps)
    bound = mean + z_thresh * std
    spike = z > z_thresh if mode == "zscore" else norm > bound
    if counts is not True:
        spike = spike & counts
    if spike is False:  # known on the host: no clip value (it may divide by a zero z)
        clip_val = norm
    elif mode == "percentile":
        clip_val = bound
    elif clip_option == "adaptive_scaling":
        clip_val = mean + z_thresh * std / (z / z_thresh)
        if clip_factor != 1.0:  # x * 1.0 is x: skipping it changes no bit
            clip_val = clip_val * clip_factor
    else:
        clip_val = mean
    x = _select(spike, clip_val, norm)
    threshold = _at_most(x, max_norm)
    if counts is not True:  # a norm that does not count (non-finite) is bounded as a spike would be
        threshold = _select(counts, threshold, _at_most(bound, max_norm))
    update = counts & _not(spike) if skip_update_on_spike else counts
    if update is not False:
        new_mean = alpha * mean + (1 - alpha) * x
        new_var = alpha * var + (1 - alpha) * _square(x - new_mean)
        mean, var = _select(update, new_mean, mean), _select(update, new_var, var)
    spikes = _add_flag(spikes, spike)
    if counts is not True:
        z = _select(counts, z, _constant(norm, math.nan))
    return ZClipState(buffer, _add_flag(count, counts), mean, var, spikes), threshold, z, spike


@torch.no_grad()
def zclip_update(
    state: ZClipState,
    norm: Value,
    *,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_norm: Optional[float] = 1.0,
    eps: float = 1e-6,
    mode: ZClipMode = "zscore",
    clip_option: ZClipOption = "adaptive_scaling",
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
    finite: Optional[Flag] = None,
) -> tuple[ZClipState, Value, Value, Flag]:
    """One ZClip step: the threshold for this norm, its z-score, whether it is a spike, and the new state.

    The reference algorithm (``bluorion-com/ZClip``, ``ZClip.step``):

    * **warm-up** (the first ``warmup_steps`` finite norms): collect the norm, threshold
      ``max_norm`` (``+inf`` if ``None``); on the last, ``mean`` = their average and ``var`` = their
      population variance;
    * then ``std = sqrt(var)``, ``z = (g - mean) / (std + eps)``. In ``"zscore"`` mode a spike is
      ``z > z_thresh``, clipped to ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor``
      (``clip_option="adaptive_scaling"``) or to ``mean`` (``"mean"``). In ``"percentile"`` mode a
      spike is ``g > mean + z_thresh * std``, clipped to that value. The threshold in force is
      ``min(clip value if spike else g, max_norm)``;
    * the EMA takes the clip value on a spike (unless ``skip_update_on_spike``) and ``g`` otherwise:
      ``mean = alpha * mean + (1 - alpha) * x``, then ``var = alpha * var + (1 - alpha) * (x - mean)^2``
      with the updated mean.

    A non-finite norm changes nothing in the state (it neither counts toward warm-up nor enters the
    EMA) and is never a spike; its threshold is ``min(mean + z_thresh * std, max_norm)`` after warm-up.

    Args:
        norm: this step's pre-clip global gradient norm: a 0-dim tensor (the state on the device,
            nothing read back), or a Python float with a state on the host (the reference's float64
            arithmetic, no kernel).
        finite: whether to take ``norm`` into the statistics, if the caller knows it on the host
            (``True``/``False``): while the host knows every step's, it also knows the phase
            (``count`` stays a host integer), and a step runs only its own phase's few kernels, with
            the same result. ``None`` (default): whether ``norm`` is finite, checked where it is.

    Returns:
        ``(new_state, threshold, z, spike)``: 0-dim tensors (Python numbers on the host); ``z`` is 0
        during warm-up.

    References:
        Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507.
    """
    if mode not in ("zscore", "percentile"):
        raise ValueError(f"`mode` must be 'zscore' or 'percentile', got {mode!r}")
    if mode == "zscore" and clip_option not in ("adaptive_scaling", "mean"):
        raise ValueError(f"`clip_option` must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
    norm = _host_norm(norm)
    _check_form(state, norm)
    if not state.on_host:
        norm = norm.to(device=state.mean.device, dtype=state.mean.dtype)
    finite = _finite_flag(norm, finite)
    track = functools.partial(_zclip_track, alpha=alpha, z_thresh=z_thresh, max_norm=max_norm, eps=eps, mode=mode,
                              clip_option=clip_option, clip_factor=clip_factor,
                              skip_update_on_spike=skip_update_on_spike)  # fmt: skip
    warm = state.count >= len(state.buffer)  # warm-up finished before this step
    if isinstance(warm, bool):  # the host knows the phase
        return track(state, norm, finite) if warm else _zclip_collect(state, norm, finite, max_norm)
    collected = _zclip_collect(state, norm, finite & ~warm, max_norm)
    tracked = track(state, norm, finite & warm)
    new_state = ZClipState(*(torch.where(warm, b, a) for a, b in zip(collected[0], tracked[0])))
    threshold, z, spike = (torch.where(warm, b, a) for a, b in zip(collected[1:], tracked[1:]))
    return new_state, threshold, z, spike
