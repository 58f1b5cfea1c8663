"""Adaptive clipping rules: AGC's unit-wise limits, AutoClip's percentile of past norms, ZClip's z-score.

AGC (Brock et al. 2021) is stateless: each unit (output row of a weight) is clipped relative to the
norm of the weight itself, on the device.

AutoClip (Seetharaman et al. 2020) and ZClip (Kumar et al. 2025) keep a small state of past global
gradient norms. As in their reference implementations (and torch's ``GradScaler``, which reads one
value per step too), the state is Python numbers, updated from the step's norm read to the host:
each step is one pure function ``update(state, norm) -> (state, threshold, ...)`` in float64 with
no kernel at all, so that

* a non-finite norm (inf or NaN) never enters the state: the update keeps the old values;
* the state is a ``NamedTuple`` of plain numbers, saved and restored as it is (``state._asdict()``),
  and a resumed run continues exactly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin.functional.clip import is_parameter
from gradclip_plugin.functional.distributed import is_dtensor
from gradclip_plugin.functional.norms import Tensors, accumulation_dtype, as_tensor_list, check_norm_type
from gradclip_plugin.functional.norms import check_positive, check_real, combine_norms, group_norms

__all__ = ["AutoClipState", "SpikeWindow", "ZClipState", "adagc_update", "adaptive_clip_grad_", "agc_coefficients",
           "autoclip_update", "scale_units_", "spike_update", "threshold_coefficient", "unit_counts", "unitwise_norm",
           "unitwise_norms", "zclip_update"]

ZClipMode = Literal["zscore", "percentile"]
ZClipOption = Literal["adaptive_scaling", "mean"]


# ---------------------------------------------------------------------------------------------- AGC
@torch.no_grad()
def unitwise_norm(x: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of each unit of ``x``, shaped as timm's ``unitwise_norm``.

    A unit is a slice along the first (output) dimension, as PyTorch stores ``Linear`` and
    ``ConvNd`` weights; a tensor of one dimension or less (a bias, a gain) is one unit. Accumulated
    in float32 (float64 for float64 inputs). A unit with no entry has norm 0, whatever ``norm_type``.

    Returns:
        A 0-dim tensor for ``x.dim() <= 1``, else a tensor of shape ``(x.shape[0], 1, ..., 1)``.

    Raises:
        ValueError: for a complex ``x`` (see :func:`unitwise_norms`).

    References:
        Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization";
        timm ``timm/utils/agc.py``.
    """
    norm_type = check_norm_type(norm_type)
    check_real(x.dtype, "AGC", "x")
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:  # torch's inf norm refuses an empty reduction (it has no identity)
        return torch.zeros(x.shape[:1] + (1,) * (x.dim() - 1) if x.dim() > 1 else (), dtype=acc, device=x.device)
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
    back to the host. A zero-size tensor's units have norm 0, whatever ``norm_type``.

    Returns:
        A 1-D float32 tensor (float64 if every tensor is float64); empty for no tensors.

    Raises:
        ValueError: for a ``DTensor`` (sharded) input, or a complex one (AGC does not support complex
            parameters).
    """
    tensors = as_tensor_list(tensors)
    norm_type = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0)
    if any(is_dtensor(t) for t in tensors):
        raise ValueError("unit-wise norms of sharded (DTensor) tensors are not supported: a unit split across ranks would be "
                         "measured by its local piece. Use global-norm clipping (ClipByGlobalNorm, AutoClip, ZClip), which "
                         "reduces the norms of sharded gradients across ranks.")
    first = tensors[0].device
    parts: list[Optional[Tensor]] = [None] * len(tensors)
    small: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        check_real(t.dtype, "AGC", "tensors")
        if t.dim() <= 1:
            small.setdefault((t.device, t.dtype), []).append(i)
        elif t.numel() == 0:  # torch's inf norm refuses an empty reduction: zero-size units have norm 0
            parts[i] = torch.zeros(t.shape[0], dtype=accumulation_dtype(t.dtype), device=t.device)
        else:
            parts[i] = torch.linalg.vector_norm(t.flatten(1), norm_type, dim=1, dtype=accumulation_dtype(t.dtype))
    for (device, dtype), idx in small.items():
        for i, n in zip(idx, group_norms([tensors[i] for i in idx], norm_type, device, dtype)):
            parts[i] = n.reshape(1)
    dtype = torch.float64 if all(p.dtype == torch.float64 for p in parts) else torch.float32  # type: ignore[union-attr]
    return torch.cat([p.to(device=first, dtype=dtype) for p in parts])  # type: ignore[union-attr]


@torch.no_grad()
def agc_coefficients(grad_norms: Tensor, param_norms: Tensor, clip_factor: float = 0.01,
                     eps: float = 1e-3) -> tuple[Tensor, Tensor]:  # fmt: skip
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
    check_positive("clip_factor", clip_factor)
    check_positive("eps", eps)
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
def adaptive_clip_grad_(parameters: Union[Tensor, Iterable[Tensor]], clip_factor: float = 0.01, eps: float = 1e-3,
                        norm_type: float = 2.0) -> Tensor:  # fmt: skip
    """Unit-wise adaptive gradient clipping of ``p.grad`` in place, as timm's ``adaptive_clip_grad``.

    Each unit ``G_u`` of a gradient is scaled to ``clip_factor * max(||W_u||, eps)`` where its norm
    exceeds that limit (see :func:`agc_coefficients`).

    Args:
        parameters: a parameter or an iterable of parameters (the limits come from the weights):
            ``nn.Parameter``s, frozen or not, stand for their ``.grad``; those without one are skipped.
        clip_factor: the allowed ratio of gradient to parameter norm, per unit.
        eps: floor on the parameter norm (so zero-initialised parameters can still move).
        norm_type: order of the unit-wise norms.

    Returns:
        The pre-clip norm of all gradients together, a 0-dim tensor.

    Raises:
        ValueError: for a tensor that is not a parameter (see ``is_parameter``): a gradient, say; for a
            complex parameter (AGC does not support them); nothing is clipped then.

    References:
        Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization".
    """
    params = as_tensor_list(parameters)
    for p in params:
        if not is_parameter(p):
            raise ValueError(f"`parameters` must be the parameters (nn.Parameter, frozen or not), not their gradients: got a "
                             f"tensor of shape {tuple(p.shape)}; AGC's limits come from the weights. Pass `model.parameters()`.")
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    grad_norms = unitwise_norms(grads, norm_type)
    coefs, _ = agc_coefficients(grad_norms, unitwise_norms(params, norm_type), clip_factor, eps)
    scale_units_(grads, coefs)
    return combine_norms(grad_norms, norm_type)


def threshold_coefficient(threshold: float, norm: float) -> float:
    """``threshold / norm`` where ``norm > threshold``, else exactly 1.

    Unlike ``min(1, threshold / norm)`` this is never NaN for a finite norm: an adaptive threshold
    can be 0 (a history of zero gradients) and ``0 / 0`` would poison the gradients. A NaN norm
    gives 1 (the gradients are already NaN and the non-finite policy decides their fate).
    """
    return threshold / norm if norm > threshold else 1.0


# ---------------------------------------------------------------------------------------------- AutoClip
class AutoClipState(NamedTuple):
    """AutoClip's history of finite pre-clip gradient norms (start from ``AutoClipState()``)."""

    history: tuple[float, ...] = ()  #: the norms recorded, oldest first (the ``history_size`` newest)
    ranked: tuple[float, ...] = ()  #: the same norms, sorted (the percentile is read from it)


def _check_percentile(percentile: float) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise ValueError(f"`percentile` must be a number in [0, 100] (10 in the paper), got {percentile!r}")


def _check_history_size(history_size: Optional[int]) -> None:
    bad = isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
    if history_size is not None and bad:
        raise ValueError(f"`history_size` must be a positive integer or None (keep every norm), got {history_size!r}")


def percentile_of(ranked: tuple[float, ...], percentile: float) -> float:
    """The ``percentile`` of the sorted ``ranked``, interpolated linearly as ``numpy.percentile``
    (position ``(n - 1) * percentile / 100``); ``inf`` for an empty tuple (no clipping)."""
    if not ranked:
        return math.inf
    position = (len(ranked) - 1) * (percentile / 100.0)
    lo = math.floor(position)
    hi, frac = min(lo + 1, len(ranked) - 1), position - lo
    return ranked[lo] + frac * (ranked[hi] - ranked[lo])


def autoclip_update(state: AutoClipState, norm: float, percentile: float = 10.0,
                    history_size: Optional[int] = None) -> tuple[AutoClipState, float]:  # fmt: skip
    """Record ``norm`` and return the clipping threshold: the ``percentile``-th percentile of the history.

    The history includes this step's norm (the paper's order: append, then take the percentile),
    restricted to the ``history_size`` most recent finite norms (all of them if ``None``). The
    percentile interpolates linearly between the closest ranks, as ``numpy.percentile``. A
    non-finite ``norm`` is not recorded; the threshold is then the percentile of the history so far
    (``inf`` if empty). A state recorded with a larger ``history_size`` keeps its newest norms.

    Args:
        state: ``AutoClipState()`` or the result of a previous update.
        norm: this step's pre-clip global gradient norm, as a Python float.
        percentile: in [0, 100].
        history_size: number of most recent norms kept, or ``None`` for all.

    Returns:
        ``(new_state, threshold)``.

    References:
        Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
        Networks" (github.com/pseeth/autoclip).
    """
    _check_percentile(percentile)
    _check_history_size(history_size)
    history, ranked = state
    if math.isfinite(norm):
        i = bisect.bisect_right(ranked, norm)
        history, ranked = history + (norm,), ranked[:i] + (norm,) + ranked[i:]
    while history_size is not None and len(history) > history_size:  # forget the oldest
        i = bisect.bisect_left(ranked, history[0])
        history, ranked = history[1:], ranked[:i] + ranked[i + 1 :]
    return AutoClipState(history, ranked), percentile_of(ranked, percentile)


# ---------------------------------------------------------------------------------------------- ZClip
class ZClipState(NamedTuple):
    """ZClip's warm-up buffer, then its exponential moving statistics (start from ``ZClipState()``)."""

    buffer: tuple[float, ...] = ()  #: the finite norms collected during warm-up (empty after it)
    mean: Optional[float] = None  #: EMA of the norm; ``None`` until warm-up ends
    var: Optional[float] = None  #: EMA of the squared deviation; ``None`` until warm-up ends
    spikes: int = 0  #: steps detected as spikes so far


def zclip_update(state: ZClipState, norm: float, *, alpha: float = 0.97, z_thresh: float = 2.5, max_norm: Optional[float] = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: ZClipMode = "zscore", clip_option: ZClipOption = "adaptive_scaling",
                 clip_factor: float = 1.0, skip_update_on_spike: bool = False) -> tuple[ZClipState, float, float, bool]:  # fmt: skip
    """One ZClip step: the threshold for this norm, its z-score, whether it is a spike, and the new state.

    The reference algorithm (``bluorion-com/ZClip``, ``ZClip.step``), in its own order of operations:

    * **warm-up** (the first ``warmup_steps`` finite norms): collect the norm, threshold
      ``max_norm`` (``inf`` if ``None``); on the last, ``mean`` = their average and ``var`` = their
      population variance;
    * then ``std = var ** 0.5``, ``z = (g - mean) / (std + eps)``. In ``"zscore"`` mode a spike is
      ``z > z_thresh``, clipped to ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor``
      (``clip_option="adaptive_scaling"``) or to ``mean`` (``"mean"``). In ``"percentile"`` mode a
      spike is ``g > mean + z_thresh * std``, clipped to that value. The threshold in force is
      ``min(clip value if spike else g, max_norm)``;
    * the EMA takes the clip value on a spike (unless ``skip_update_on_spike``) and ``g`` otherwise:
      ``mean = alpha * mean + (1 - alpha) * x``, then ``var = alpha * var + (1 - alpha) * (x - mean)^2``
      with the updated mean.

    A non-finite norm changes nothing in the state (it neither counts toward warm-up nor enters the
    EMA) and is never a spike; its z-score is NaN and its threshold ``min(mean + z_thresh * std,
    max_norm)`` after warm-up.

    Returns:
        ``(new_state, threshold, z, spike)``; ``z`` is 0 during warm-up.

    References:
        Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507.
    """
    if mode not in ("zscore", "percentile"):
        raise ValueError(f"`mode` must be 'zscore' or 'percentile', got {mode!r}")
    if clip_option not in ("adaptive_scaling", "mean"):
        raise ValueError(f"`clip_option` must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
    cap = math.inf if max_norm is None else max_norm
    buffer, mean, var, spikes = state
    finite = math.isfinite(norm)
    if mean is None:  # warm-up
        if finite:
            buffer += (norm,)
        if len(buffer) >= warmup_steps:  # the reference's sums, in its order
            mean = sum(buffer) / len(buffer)
            var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            buffer = ()
        return ZClipState(buffer, mean, var, spikes), cap, 0.0, False
    std = var**0.5
    bound = mean + z_thresh * std
    if not finite:
        return state, min(bound, cap), math.nan, False
    z = (norm - mean) / (std + eps)
    clip: Optional[float] = None
    if mode == "percentile":
        clip = bound if norm > bound else None
    elif z > z_thresh:
        clip = (mean + z_thresh * std / (z / z_thresh)) * clip_factor if clip_option == "adaptive_scaling" else mean
    if clip is None or not skip_update_on_spike:
        x = norm if clip is None else clip
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    spike = clip is not None
    return ZClipState(buffer, mean, var, spikes + spike), min(norm if clip is None else clip, cap), z, spike


# ---------------------------------------------------------------------------------------------- AdaGC
@torch.no_grad()
def adagc_update(gamma: Tensor, norms: Tensor, *, warmup: bool, lambda_abs: float = 1.0, lambda_rel: float = 1.05,
                 beta: float = 0.98, skip: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One AdaGC step for tensors of per-tensor 2-norms ``norms``: their coefficients, limits and new ``gamma``.

    * **warm-up** (``warmup``): global clipping, every coefficient ``min(1, lambda_abs / ||g||)`` (``||g||``
      the total norm), and ``gamma_i = min(gamma_i, clipped norm_i)``;
    * then each tensor is clipped to ``lambda_rel * gamma_i``: coefficient ``min(1, lambda_rel * gamma_i / norm_i)``,
      and ``gamma_i = beta * gamma_i + (1 - beta) * clipped norm_i`` (as ``lerp``).

    ``gamma`` starts at ``inf``; a tensor whose ``gamma`` is still ``inf`` after warm-up (it had no finite
    gradient during it) is clipped globally and takes the warm-up rule, as in pytorch-optimizer. No
    epsilon: a coefficient is exactly 1 at or under its limit, and 1 for a zero norm against a zero limit.
    ``gamma`` is left as it was at a step with a non-finite clipped norm (the whole step), and where
    ``skip`` (a 0-dim bool tensor) is true. Nothing is read to the host.

    Returns:
        ``(new_gamma, coefficients, limits)``; ``limits`` is ``lambda_rel * gamma`` before the update.

    References:
        Wang et al. 2025, "AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient Clipping",
        arXiv 2502.11034, Algorithm 1.
    """
    check_positive("lambda_abs", lambda_abs)
    check_positive("lambda_rel", lambda_rel)
    total = torch.linalg.vector_norm(norms)
    limits = lambda_rel * gamma
    fresh = torch.isinf(gamma) | warmup  # clipped globally: in warm-up, or never measured
    coefs = torch.where(fresh, torch.where(total > lambda_abs, lambda_abs / total, 1.0),
                        torch.where(norms > limits, limits / norms, 1.0))  # fmt: skip
    clipped = norms * coefs
    new = torch.where(fresh, torch.minimum(gamma, clipped), torch.lerp(gamma, clipped, 1.0 - beta))
    keep = ~torch.isfinite(clipped).all() if skip is None else skip | ~torch.isfinite(clipped).all()
    return torch.where(keep, gamma, new), coefs, limits


# ---------------------------------------------------------------------------------------------- spike skipping
class SpikeWindow(NamedTuple):
    """The last ``window`` finite values of each watched quantity (a column each), oldest first, and how
    many of the rows are real (the first ``window - count`` are not yet)."""

    values: Tensor  #: ``(window, k)``, float32
    count: Tensor  #: 0-dim int64


@torch.no_grad()
def spike_update(state: Optional[SpikeWindow], x: Tensor, *, window: int, sigma: float,
                 record: Union[bool, Tensor] = True) -> tuple[SpikeWindow, Tensor, Tensor]:  # fmt: skip
    """Whether this step's values ``x`` (``k`` of them: a loss, a norm) spike against the window, then the
    window with ``x`` added.

    OLMo-core's ``SkipStepOptimizer.get_step_factor`` on finite values: a value spikes when
    ``x - mean > sigma * std`` (``std`` unbiased) over the previous values in the window, once
    ``max(3, window // 2)`` values have been seen, this one included: OLMo-core's ``max(2, window // 2)``,
    but for a window under 6, whose std of one value (NaN) would skip every step once active. Beyond it: a
    step with a non-finite value spikes, and enters nothing (its window is not poisoned); nor does a
    step whose ``record`` is false. Nothing is read to the host.

    Returns:
        ``(new_state, skip, limits)``: ``skip`` a 0-dim bool tensor, ``limits`` the ``k`` values
        ``mean + sigma * std`` in force (NaN while the window is not active).
    """
    x = x.detach().reshape(-1).float()
    if state is None:
        state = SpikeWindow(x.new_zeros(window, x.numel()), torch.zeros((), dtype=torch.long, device=x.device))
    values, count = state.values.to(x.device), state.count.to(x.device)
    real = (torch.arange(window, device=x.device) >= window - count).unsqueeze(1)
    # while the window fills: two passes in float64, rounded to float32 (a constant window: std 0, as torch.std_mean)
    wide = torch.where(real, values, 0.0).to(torch.float32 if x.device.type == "mps" else torch.float64)
    mean = wide.sum(0) / count
    mean, std = mean.float(), (torch.where(real, wide - mean, 0.0).square().sum(0) / (count - 1)).sqrt().float()
    full_std, full_mean = torch.std_mean(values.T.contiguous(), dim=1)  # a full window: OLMo-core's own statistics
    mean, std = torch.where(count == window, full_mean, mean), torch.where(count == window, full_std, std)
    active = count >= max(2, window // 2 - 1)
    finite = torch.isfinite(x).all()
    skip = ~finite | (active & ~((x - mean) <= sigma * std).all())  # OLMo-core's comparison, NaN-safe
    enter = finite & record
    new = SpikeWindow(torch.where(enter, torch.cat([values[1:], x.unsqueeze(0)]), values), torch.clamp(count + enter.long(), max=window))
    return new, skip, torch.where(active, mean + sigma * std, math.nan)
