"""Adaptive clipping arithmetic against the papers' formulas, the issue's hand-worked vectors and numpy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from gradclip_plugin.functional.adaptive import (
    AutoClipState,
    ZClipState,
    adaptive_clip_grad_,
    agc_coefficients,
    autoclip_update,
    scale_units_,
    threshold_coefficient,
    unit_counts,
    unitwise_norm,
    unitwise_norms,
    zclip_update,
)

INF = float("inf")


# ---------------------------------------------------------------------------------------------- AGC
def direct_unit_norm(x: torch.Tensor, p: float) -> torch.Tensor:
    """The definition, one unit at a time: dim 0 is the output dim, <=1-dim tensors are one unit."""
    x = x.double()
    if x.dim() <= 1:
        return torch.tensor([torch.linalg.vector_norm(x.reshape(-1), p).item()], dtype=torch.float64)
    return torch.tensor([torch.linalg.vector_norm(x[i].reshape(-1), p).item() for i in range(x.shape[0])], dtype=torch.float64)


def direct_agc(w: torch.Tensor, g: torch.Tensor, clip_factor: float, eps: float, p: float = 2.0) -> torch.Tensor:
    """Brock et al. 2021, eq. (3), unit by unit: G_u <- limit * G_u / ||G_u|| where ||G_u|| > limit."""
    out = g.double().clone()
    wn, gn = direct_unit_norm(w, p), direct_unit_norm(g, p)
    units = out.reshape(1, -1) if out.dim() <= 1 else out
    for i in range(len(wn)):
        limit = clip_factor * max(wn[i].item(), eps)
        if gn[i].item() > limit:
            units[i] *= limit / gn[i].item()
    return out


def timm_formula(w: torch.Tensor, g: torch.Tensor, clip_factor: float, eps: float) -> torch.Tensor:
    """timm / DeepMind: keep G where ||G_u|| < limit, else G * limit / max(||G_u||, 1e-6) (whole-tensor ops)."""
    dims = tuple(range(1, w.dim()))
    wn = w.norm(2) if w.dim() <= 1 else w.norm(2, dim=dims, keepdim=True)
    gn = g.norm(2) if g.dim() <= 1 else g.norm(2, dim=dims, keepdim=True)
    limit = wn.clamp(min=eps) * clip_factor
    return torch.where(gn < limit, g, g * (limit / gn.clamp(min=1e-6)))


def agc_cases():
    g = torch.Generator().manual_seed(0)
    conv_w = torch.randn(6, 3, 3, 3, generator=g) * 0.1
    lin_w = torch.randn(5, 7, generator=g) * 0.2
    bias = torch.randn(5, generator=g) * 0.05
    return {
        "conv": (conv_w, torch.randn(6, 3, 3, 3, generator=g) * torch.tensor([1e-4, 1e-2, 1.0, 3e-3, 0.0, 5.0]).view(6, 1, 1, 1)),
        "linear": (lin_w, torch.randn(5, 7, generator=g) * torch.tensor([1e-5, 1e-3, 1.0, 0.1, 2e-3]).view(5, 1)),
        "bias": (bias, torch.randn(5, generator=g)),
        "zero_bias": (torch.zeros(4), torch.tensor([1e-6, -2e-6, 3e-6, 0.0])),
        "zero_linear": (torch.zeros(3, 4), torch.randn(3, 4, generator=g) * torch.tensor([1e-7, 1e-5, 1.0]).view(3, 1)),
        "scalar": (torch.tensor(0.5), torch.tensor(2.0)),
        "zero_grad": (lin_w, torch.zeros(5, 7)),
    }


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, INF])
@pytest.mark.parametrize("shape", [(), (5,), (4, 3), (6, 3, 3, 3), (2, 3, 4, 5, 1)])
def test_unitwise_norm_matches_definition(shape, norm_type):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = unitwise_norm(x, norm_type)
    expected_shape = () if len(shape) <= 1 else (shape[0],) + (1,) * (len(shape) - 1)
    assert got.shape == expected_shape
    torch.testing.assert_close(got.reshape(-1).double(), direct_unit_norm(x, norm_type), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_unitwise_norms_layout_and_dtypes(norm_type):
    gen = torch.Generator().manual_seed(2)
    ts = [
        torch.randn(4, 3, generator=gen),
        torch.randn(3, generator=gen).to(torch.bfloat16),
        torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        torch.randn((), generator=gen),
        torch.randn(5, generator=gen),
        torch.empty(0, 3),
    ]
    got = unitwise_norms(ts, norm_type)
    assert unit_counts(ts) == [4, 1, 2, 1, 1, 0]
    assert got.dtype == torch.float32 and got.shape == (9,)
    expected = torch.cat([direct_unit_norm(t.float(), norm_type) if t.numel() else torch.zeros(0, dtype=torch.float64) for t in ts])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert unitwise_norms([torch.randn(3, 2, dtype=torch.float64)]).dtype == torch.float64
    assert unitwise_norms([]).numel() == 0


@pytest.mark.parametrize("case", list(agc_cases()))
@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.1, 1e-2), (1.0, 1e-3)])
def test_agc_matches_formula(case, clip_factor, eps):
    w, g = agc_cases()[case]
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_(p, clip_factor=clip_factor, eps=eps)
    expected = direct_agc(w, g, clip_factor, eps)
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-6, atol=1e-12)
    # invariants: every unit within its limit, direction kept, clipping twice changes nothing
    limits = clip_factor * direct_unit_norm(w, 2.0).clamp(min=eps)
    assert (direct_unit_norm(p.grad, 2.0) <= limits * (1 + 1e-6)).all()
    assert torch.isfinite(p.grad).all()
    assert ((p.grad * g) >= 0).all()
    once = p.grad.clone()
    adaptive_clip_grad_(p, clip_factor=clip_factor, eps=eps)
    torch.testing.assert_close(p.grad, once, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", list(agc_cases()))
def test_agc_matches_timm_formula_at_defaults(case):
    # with clip_factor * eps >= 1e-6 the 1e-6 floor of timm/DeepMind never binds: same result
    w, g = agc_cases()[case]
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_([p])
    torch.testing.assert_close(p.grad, timm_formula(w, g, 0.01, 1e-3), rtol=1e-6, atol=1e-12)


def test_agc_zero_initialised_bias_gets_clip_factor_times_eps():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    adaptive_clip_grad_(p, clip_factor=0.02, eps=1e-3)
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0]) * (0.02 * 1e-3 / 5.0))
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(2e-5, rel=1e-6)


@pytest.mark.parametrize("norm_type", [1.0, INF])
def test_agc_other_norm_types(norm_type):
    w, g = agc_cases()["conv"]
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    adaptive_clip_grad_(p, clip_factor=0.05, norm_type=norm_type)
    torch.testing.assert_close(p.grad.double(), direct_agc(w, g, 0.05, 1e-3, norm_type), rtol=1e-6, atol=1e-12)


def test_agc_returns_global_norm_and_skips_missing_grads():
    a, b, c = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2))
    a.grad, c.grad = torch.randn(3, 2) * 10, torch.randn(2)
    expected = torch.linalg.vector_norm(torch.cat([a.grad.reshape(-1), c.grad])).item()
    assert adaptive_clip_grad_([a, b, c]).item() == pytest.approx(expected, rel=1e-6)  # pre-clip
    assert b.grad is None
    assert adaptive_clip_grad_([b]).item() == 0.0


def test_agc_coefficients_and_scale_units_layout():
    grads = [torch.ones(2, 3), torch.ones(4), torch.ones(3, 1, 2)]
    coefs = torch.tensor([0.5, 1.0, 0.25, 2.0, 3.0, 1.0])
    scale_units_(grads, coefs)
    assert grads[0].tolist() == [[0.5] * 3, [1.0] * 3]
    assert grads[1].tolist() == [0.25] * 4
    assert grads[2][:, 0, 0].tolist() == [2.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="one entry per unit"):
        scale_units_(grads, torch.ones(3))
    c, limits = agc_coefficients(torch.tensor([0.0, 1.0, 1e-3]), torch.tensor([0.0, 1.0, 1.0]), 0.01, 1e-3)
    assert c.tolist() == pytest.approx([1.0, 0.01, 1.0])
    assert limits.tolist() == pytest.approx([1e-5, 0.01, 0.01])
    for name, kwargs in [("clip_factor", dict(clip_factor=0.0)), ("eps", dict(eps=-1.0)), ("clip_factor", dict(clip_factor=INF))]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            agc_coefficients(torch.ones(1), torch.ones(1), **{"clip_factor": 0.01, "eps": 1e-3, **kwargs})


def test_threshold_coefficient_never_nan_for_finite_norms():
    cases = [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 4.0, 0.25), (2.0, 1.0, 1.0), (INF, 3.0, 1.0), (1.0, 1.0, 1.0)]
    for threshold, norm, expected in cases:
        assert threshold_coefficient(threshold, norm) == expected
    assert threshold_coefficient(1.0, float("nan")) == 1.0


def test_adaptive_clip_grad_refuses_gradients_naming_the_fix():
    p = torch.nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"`parameters` must be the parameters .*Pass `model.parameters\(\)`"):
        adaptive_clip_grad_([p.grad])
    with pytest.raises(ValueError, match=r"`parameters` must be the parameters"):  # a gradient among parameters
        adaptive_clip_grad_([p, p.grad])
    assert torch.equal(p.grad, torch.ones(3, 2))


def test_adaptive_clip_grad_passes_over_frozen_parameters():
    frozen, trained = torch.nn.Parameter(torch.ones(3, 2), requires_grad=False), torch.nn.Parameter(torch.ones(3, 2))
    trained.grad = torch.full((3, 2), 10.0)
    adaptive_clip_grad_([frozen, trained], clip_factor=0.01)
    torch.testing.assert_close(torch.linalg.vector_norm(trained.grad[0]), 0.01 * torch.linalg.vector_norm(trained[0].detach()))


def test_adaptive_clip_grad_over_frozen_parameters_alone_clips_nothing():
    # nn.Parameters stand for their gradients, frozen or not (torch's rule): none has one, so nothing is clipped.
    model = torch.nn.Linear(3, 2).requires_grad_(False)
    weights = [p.detach().clone() for p in model.parameters()]
    assert adaptive_clip_grad_(model.parameters()).item() == 0.0
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))


ZERO_SIZE = [(3, 0), (0,), (0, 4), (2, 0, 5)]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, INF])
def test_unitwise_norms_of_zero_size_tensors_are_zero(norm_type):
    # torch's inf norm refuses an empty reduction (no identity): an empty unit's norm is 0, as for any other order
    ts = [torch.tensor([[3.0, -4.0], [1.0, 2.0]]), *[torch.empty(s) for s in ZERO_SIZE], torch.tensor([-5.0, 2.0])]
    assert unit_counts(ts) == [2, 3, 1, 0, 2, 1]
    got = unitwise_norms(ts, norm_type)
    expected = torch.cat([direct_unit_norm(ts[0], norm_type), torch.zeros(6, dtype=torch.float64),
                          direct_unit_norm(ts[-1], norm_type)])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    if norm_type == INF:  # by hand
        assert got.tolist() == [4.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]
    for s in ZERO_SIZE:
        one = unitwise_norm(torch.empty(s), norm_type)
        assert one.shape == (() if len(s) <= 1 else (s[0],) + (1,) * (len(s) - 1)) and not one.any()


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_agc_passes_over_zero_size_parameters(norm_type):
    (w, g), (b, gb) = agc_cases()["linear"], agc_cases()["bias"]
    params = [torch.nn.Parameter(t.clone()) for t in [w, torch.empty(0, 4), torch.empty(3, 0), b, torch.empty(0)]]
    for p, grad in zip(params, [g, torch.empty(0, 4), torch.empty(3, 0), gb, torch.empty(0)]):
        p.grad = grad.clone()
    norm = adaptive_clip_grad_(params, clip_factor=0.01, eps=1e-3, norm_type=norm_type)
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1), gb]), norm_type)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, (weight, grad) in zip([params[0], params[3]], [(w, g), (b, gb)]):  # the others as without the empty ones
        expected = direct_agc(weight, grad, 0.01, 1e-3, norm_type)
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-6, atol=1e-12)
        if norm_type == 2.0:
            torch.testing.assert_close(p.grad, timm_formula(weight, grad, 0.01, 1e-3), rtol=1e-6, atol=1e-12)
    assert [p.grad.shape for p in params[1:3] + params[4:]] == [(0, 4), (3, 0), (0,)]


def test_agc_refuses_complex_parameters_before_clipping_anything():
    real = torch.nn.Parameter(torch.ones(3))
    real.grad = torch.full((3,), 10.0)
    cplx = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.complex64))
    cplx.grad = torch.full((3, 2), 10 + 10j)
    for call in (lambda: adaptive_clip_grad_([real, cplx]), lambda: unitwise_norms([real.grad, cplx.grad])):
        with pytest.raises(ValueError, match=r"AGC does not support complex parameters, got torch\.complex64 in `"):
            call()
    assert torch.equal(real.grad, torch.full((3,), 10.0)) and torch.equal(cplx.grad, torch.full((3, 2), 10 + 10j))


# ---------------------------------------------------------------------------------------------- AutoClip
def run_autoclip(norms, percentile=10.0, history_size=None):
    state, out = AutoClipState(), []
    for n in norms:
        state, thr = autoclip_update(state, n, percentile, history_size)
        out.append(thr)
    return state, out


def test_autoclip_issue_vector():
    _, thresholds = run_autoclip([1.0, 2.0, 3.0, 10.0], percentile=10.0)
    clipped = [min(n, t) for n, t in zip([1.0, 2.0, 3.0, 10.0], thresholds)]
    assert clipped == pytest.approx([1.0, 1.1, 1.2, 1.3], rel=1e-12)


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("history_size", [None, 1, 5, 64])
def test_autoclip_matches_numpy_percentile(percentile, history_size):
    rng = random.Random(int(percentile * 10) + (history_size or 0))
    norms = [rng.lognormvariate(0.0, 1.0) * (20.0 if rng.random() < 0.1 else 1.0) for _ in range(150)]
    state = AutoClipState()
    for i, n in enumerate(norms):
        state, thr = autoclip_update(state, n, percentile, history_size)
        hist = norms[: i + 1] if history_size is None else norms[max(0, i + 1 - history_size) : i + 1]
        assert isinstance(thr, float)
        assert thr == pytest.approx(float(np.percentile(hist, percentile)), rel=1e-12)
        assert thr == pytest.approx(torch.quantile(torch.tensor(hist, dtype=torch.float64), percentile / 100).item(), rel=1e-12)
        assert state.history == tuple(hist) and state.ranked == tuple(sorted(hist))


@pytest.mark.parametrize("history_size", [None, 3])
@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
def test_autoclip_nonfinite_norms_never_enter_history(history_size, bad):
    seq = [1.0, bad, 2.0, 3.0, bad, bad, 10.0, 0.5]
    finite: list[float] = []
    state = AutoClipState()
    for n in seq:
        state, thr = autoclip_update(state, n, 25.0, history_size)
        finite += [n] if math.isfinite(n) else []
        hist = finite if history_size is None else finite[-history_size:]
        assert thr == pytest.approx(float(np.percentile(hist, 25.0)), rel=1e-12)
        assert state.history == tuple(hist)


def test_autoclip_empty_history_with_nonfinite_norm_is_no_clip():
    state, thr = autoclip_update(AutoClipState(), float("nan"))
    assert thr == INF and state == AutoClipState()
    assert threshold_coefficient(thr, 5.0) == 1.0


def test_autoclip_validation_and_purity():
    with pytest.raises(ValueError, match="`percentile`"):
        autoclip_update(AutoClipState(), 1.0, percentile=101.0)
    with pytest.raises(ValueError, match="`history_size`"):
        autoclip_update(AutoClipState(), 1.0, history_size=0)
    state = AutoClipState((2.0,), (2.0,))
    new, _ = autoclip_update(state, 1.0, history_size=3)
    assert state == AutoClipState((2.0,), (2.0,)) and new == AutoClipState((2.0, 1.0), (1.0, 2.0))


def test_autoclip_a_smaller_history_size_keeps_the_newest_norms():
    # a run resumed with `history_size` lowered continues from the newest norms it recorded
    state, _ = run_autoclip([5.0, 1.0, 4.0, 2.0, 3.0])
    state, thr = autoclip_update(state, 6.0, 50.0, history_size=3)
    assert state.history == (2.0, 3.0, 6.0) and state.ranked == (2.0, 3.0, 6.0) and thr == 3.0


def test_autoclip_runs_no_torch_kernel():
    mode = _TorchCalls()
    with mode:
        run_autoclip([1.0, float("nan"), 3.0, 2.0] * 10, history_size=7)
    assert mode.calls == 0


# ---------------------------------------------------------------------------------------------- ZClip
class ReferenceZClip:
    """The reference algorithm in Python floats, written from the issue's text (one norm at a time)."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.__dict__.update(locals())
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, g: float):
        """Returns (threshold in force, z, spike)."""
        cap = INF if self.max_norm is None else self.max_norm
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) == self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return cap, 0.0, False
        std = self.var ** 0.5  # as the zclip package (not always math.sqrt to the last bit)
        z = (g - self.mean) / (std + self.eps)
        clip = None
        if self.mode == "zscore" and z > self.z_thresh:
            if self.clip_option == "adaptive_scaling":
                clip = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                clip = self.mean
        elif self.mode == "percentile" and g > self.mean + self.z_thresh * std:
            clip = self.mean + self.z_thresh * std
        threshold = min(g if clip is None else clip, cap)
        if not (clip is not None and self.skip_update_on_spike):
            x = g if clip is None else clip
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return threshold, z, clip is not None



def run_zclip(norms, warmup_steps=25, **kwargs):
    state, out = ZClipState(), []
    for g in norms:
        state, *step = zclip_update(state, g, warmup_steps=warmup_steps, **kwargs)
        out.append(tuple(step))
    return state, out


def test_zclip_issue_vector():
    expected = [  # norm, mean after, var after
        (1.0, None, None),
        (2.0, None, None),
        (3.0, 2.0, 0.666667),
        (2.0, 2.0, 0.646667),
        (10.0, 2.015156, 0.634471),
    ]
    state, thresholds = ZClipState(), []
    for norm, mean, var in expected:
        state, thr, z, spike = zclip_update(state, norm, max_norm=None, warmup_steps=3)
        thresholds.append(thr)
        if mean is not None:
            assert state.mean == pytest.approx(mean, abs=1e-6)
            assert state.var == pytest.approx(var, abs=1e-6)
    assert thresholds[:3] == [INF] * 3  # warm-up, max_norm=None: no clipping
    assert thresholds[3] == 2.0  # not a spike: threshold is the norm itself
    assert thresholds[4] == pytest.approx(2.505209, abs=1e-6)
    assert spike and z == pytest.approx(8.0 / (math.sqrt(0.646667) + 1e-6), rel=1e-5)
    assert state.spikes == 1 and state.buffer == ()


CONFIGS = [
    dict(),
    dict(max_norm=None, warmup_steps=3),
    dict(max_norm=4.0, warmup_steps=5, z_thresh=2.0),
    dict(clip_option="mean", warmup_steps=4, max_norm=None),
    dict(mode="percentile", warmup_steps=4, max_norm=None, z_thresh=1.5),
    dict(clip_factor=0.7, skip_update_on_spike=True, warmup_steps=3, max_norm=6.0),
    dict(alpha=0.5, eps=1e-3, warmup_steps=1, max_norm=None),
]


def spiky_norms(seed: int, n: int = 120) -> list[float]:
    rng = random.Random(seed)
    return [abs(rng.gauss(2.0, 0.3)) * (rng.choice([5.0, 20.0, 100.0]) if rng.random() < 0.12 else 1.0) for _ in range(n)]


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside the block (grad-mode switches aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch._C._set_grad_enabled:  # the functions' @torch.no_grad(), no kernel
            self.calls += 1
        return func(*args, **(kwargs or {}))



@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_zclip_is_the_reference_bit_for_bit_with_no_kernel(cfg):
    # Python floats in the reference's own order of operations: the same numbers exactly, no torch call
    ref = ReferenceZClip(**cfg)
    kwargs = {k: v for k, v in cfg.items()}
    state, spikes, mode = ZClipState(), 0, _TorchCalls()
    for g in spiky_norms(len(str(cfg))):
        with mode:
            state, thr, z, spike = zclip_update(state, g, **kwargs)
        assert (thr, z, spike) == ref.step(g)
        spikes += spike
        if ref.mean is not None:
            assert (state.mean, state.var) == (ref.mean, ref.var)
    assert mode.calls == 0
    assert state.spikes == spikes > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_zclip_is_the_zclip_package_bit_for_bit(cfg):
    # The published implementation itself (bluorion-com/ZClip, `zclip` on PyPI), fed the same norms.
    zclip = pytest.importorskip("zclip")

    class Fed(zclip.ZClip):
        def _compute_grad_norm(self, model):
            return self.norm

        def apply_in_place_clipping(self, pl_module, global_norm, max_global_norm):
            self.threshold = max_global_norm  # the threshold in force; its own scaling adds an epsilon

    package = Fed(**{("max_grad_norm" if k == "max_norm" else k): v for k, v in cfg.items()})
    model = torch.nn.Linear(2, 2)  # its warm-up clips a model's gradients: give it one
    state = ZClipState()
    for g in spiky_norms(len(str(cfg)) + 1):
        package.norm, package.threshold = g, None
        package.step(model)
        state, thr, _, _ = zclip_update(state, g, **cfg)
        if package.initialized and package.threshold is not None:
            assert thr == package.threshold
        if package.initialized:
            assert (state.mean, state.var) == (package.mean, package.var)


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_zclip_nonfinite_norms_change_nothing(bad):
    seq = [1.0, bad, 2.0, 3.0, bad, 2.0, 10.0, bad, 2.5]
    ref = ReferenceZClip(warmup_steps=3, max_norm=5.0)
    state = ZClipState()
    for g in seq:
        before = state
        state, thr, z, spike = zclip_update(state, g, max_norm=5.0, warmup_steps=3)
        if not math.isfinite(g):
            assert state == before and not spike
            if ref.mean is None:
                assert thr == 5.0 and z == 0.0
            else:
                assert thr == pytest.approx(min(ref.mean + 2.5 * math.sqrt(ref.var), 5.0)) and math.isnan(z)
            continue
        r_thr, _, r_spike = ref.step(g)
        assert thr == r_thr and spike == r_spike
    assert state.mean is not None and math.isfinite(state.mean) and math.isfinite(state.var)


def test_zclip_validation_and_purity():
    with pytest.raises(ValueError, match="`mode`"):
        zclip_update(ZClipState(), 1.0, mode="median")
    with pytest.raises(ValueError, match="`clip_option`"):
        zclip_update(ZClipState(), 1.0, clip_option="max")
    state = ZClipState((1.0,))
    new, *_ = zclip_update(state, 3.0, warmup_steps=4)
    assert state == ZClipState((1.0,)) and new.buffer == (1.0, 3.0)


def test_zclip_a_smaller_warmup_ends_at_the_next_step():
    # a run resumed with `warmup_steps` lowered below what it collected starts its statistics at once
    state, _ = run_zclip([1.0, 2.0, 3.0], warmup_steps=5)
    state, thr, _, _ = zclip_update(state, 6.0, warmup_steps=2, max_norm=None)
    assert state.buffer == () and state.mean == 3.0 and thr == INF


@pytest.mark.parametrize("grad_norm", [10.0, 100.0, 1000.0])
def test_agc_float16_zero_bias_is_scaled_to_the_limit(grad_norm):
    # limit = clip_factor * eps = 1e-5; the coefficient 1e-5 / grad_norm is a float16 subnormal (or 0):
    # it must be applied in float32 and rounded once, not cast to float16 first.
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), grad_norm / 2, dtype=torch.float16)  # norm = grad_norm
    adaptive_clip_grad_([p], clip_factor=0.01, eps=1e-3)
    expected = (torch.full((4,), grad_norm / 2) * (1e-5 / grad_norm)).half()
    assert torch.equal(p.grad, expected)
    post = torch.linalg.vector_norm(p.grad.double()).item()
    assert post == pytest.approx(1e-5, rel=2 * torch.finfo(torch.float16).eps)
