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
    autoclip_init,
    autoclip_update,
    scale_units_,
    threshold_coefficient,
    unit_counts,
    unitwise_norm,
    unitwise_norms,
    zclip_init,
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
    thr = torch.tensor([0.0, 0.0, 1.0, 2.0, INF, 1.0])
    norm = torch.tensor([0.0, 1.0, 4.0, 1.0, 3.0, 1.0])
    assert threshold_coefficient(thr, norm).tolist() == [1.0, 0.0, 0.25, 1.0, 1.0, 1.0]
    assert threshold_coefficient(torch.tensor(1.0), torch.tensor(float("nan"))).item() == 1.0


# ---------------------------------------------------------------------------------------------- AutoClip
def run_autoclip(norms, percentile=10.0, history_size=None, dtype=torch.float32):
    state = autoclip_init(history_size, dtype=dtype)
    out = []
    for n in norms:
        state, thr = autoclip_update(state, torch.tensor(n, dtype=dtype), percentile, history_size)
        out.append(thr.item())
    return state, out


def test_autoclip_issue_vector():
    _, thresholds = run_autoclip([1.0, 2.0, 3.0, 10.0], percentile=10.0)
    clipped = [min(n, t) for n, t in zip([1.0, 2.0, 3.0, 10.0], thresholds)]
    assert clipped == pytest.approx([1.0, 1.1, 1.2, 1.3], rel=1e-6)


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("history_size", [None, 1, 5, 64])
def test_autoclip_matches_numpy_percentile(percentile, history_size):
    rng = random.Random(int(percentile * 10) + (history_size or 0))
    norms = [rng.lognormvariate(0.0, 1.0) * (20.0 if rng.random() < 0.1 else 1.0) for _ in range(150)]  # grows past 64
    state = autoclip_init(history_size, dtype=torch.float64)
    for i, n in enumerate(norms):
        state, thr = autoclip_update(state, torch.tensor(n, dtype=torch.float64), percentile, history_size)
        hist = norms[: i + 1] if history_size is None else norms[max(0, i + 1 - history_size) : i + 1]
        assert thr.item() == pytest.approx(float(np.percentile(hist, percentile)), rel=1e-12)
        assert thr.item() == pytest.approx(torch.quantile(torch.tensor(hist, dtype=torch.float64), percentile / 100).item(), rel=1e-12)
    assert state.steps == 150 and int(state.count) == 150
    assert state.history.numel() == (256 if history_size is None else history_size)
    if history_size is None:  # kept sorted, +inf padding last
        assert torch.equal(state.history, torch.sort(state.history).values)
        assert sorted(state.history[:150].tolist()) == sorted(norms)


@pytest.mark.parametrize("history_size", [None, 3])
@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
def test_autoclip_nonfinite_norms_never_enter_history(history_size, bad):
    seq = [1.0, bad, 2.0, 3.0, bad, bad, 10.0, 0.5]
    finite: list[float] = []
    state = autoclip_init(history_size)
    for n in seq:
        state, thr = autoclip_update(state, torch.tensor(n), 25.0, history_size)
        if math.isfinite(n):
            finite.append(n)
        hist = finite if history_size is None else finite[-history_size:]
        assert thr.item() == pytest.approx(float(np.percentile(hist, 25.0)), rel=1e-6)
        assert int(state.count) == len(finite)
        valid = state.history[torch.isfinite(state.history)]
        assert sorted(valid.tolist()) == pytest.approx(sorted(hist))
    assert state.steps == len(seq)


def test_autoclip_empty_history_with_nonfinite_norm_is_no_clip():
    state, thr = autoclip_update(autoclip_init(), torch.tensor(float("nan")))
    assert thr.item() == INF and int(state.count) == 0
    assert threshold_coefficient(thr, torch.tensor(5.0)).item() == 1.0


def test_autoclip_validation_and_state():
    with pytest.raises(ValueError, match="`percentile`"):
        autoclip_update(autoclip_init(), torch.tensor(1.0), percentile=101.0)
    with pytest.raises(ValueError, match="`history_size`"):
        autoclip_init(0)
    with pytest.raises(ValueError, match="`history_size` is 4 but the state holds 3"):
        autoclip_update(autoclip_init(3), torch.tensor(1.0), history_size=4)
    state = autoclip_init(3)
    assert isinstance(state, AutoClipState) and state.history.isinf().all() and state.count == 0
    # pure: the input state is not modified
    new, _ = autoclip_update(state, torch.tensor(2.0), history_size=3)
    assert state.history.isinf().all() and int(state.count) == 0 and int(new.count) == 1


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


def test_zclip_issue_vector():
    state = zclip_init(3)
    expected = [  # norm, mean after, var after
        (1.0, None, None),
        (2.0, None, None),
        (3.0, 2.0, 0.666667),
        (2.0, 2.0, 0.646667),
        (10.0, 2.015156, 0.634471),
    ]
    thresholds = []
    for norm, mean, var in expected:
        state, thr, z, spike = zclip_update(state, torch.tensor(norm), max_norm=None)
        thresholds.append(thr.item())
        if mean is not None:
            assert state.mean.item() == pytest.approx(mean, abs=1e-6)
            assert state.var.item() == pytest.approx(var, abs=1e-6)
    assert thresholds[:3] == [INF] * 3  # warm-up, max_norm=None: no clipping
    assert thresholds[3] == 2.0  # not a spike: threshold is the norm itself
    assert thresholds[4] == pytest.approx(2.505209, abs=1e-6)
    assert spike.item() and z.item() == pytest.approx(8.0 / (math.sqrt(0.646667) + 1e-6), rel=1e-5)
    assert state.spikes.item() == 1 and int(state.count) == 5


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


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_zclip_matches_reference_over_spiky_sequence(cfg):
    ref = ReferenceZClip(**cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "warmup_steps"}
    state = zclip_init(cfg.get("warmup_steps", 25), dtype=torch.float64)
    spikes = 0
    for g in spiky_norms(len(str(cfg))):
        state, thr, z, spike = zclip_update(state, torch.tensor(g, dtype=torch.float64), **kwargs)
        r_thr, r_z, r_spike = ref.step(g)
        assert thr.item() == pytest.approx(r_thr, rel=1e-12)
        assert z.item() == pytest.approx(r_z, rel=1e-12, abs=1e-12)
        assert spike.item() == r_spike
        spikes += r_spike
        if ref.mean is not None:
            assert state.mean.item() == pytest.approx(ref.mean, rel=1e-12)
            assert state.var.item() == pytest.approx(ref.var, rel=1e-12)
    assert spikes > 0 and state.spikes.item() == spikes


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_zclip_nonfinite_norms_change_nothing(bad):
    seq = [1.0, bad, 2.0, 3.0, bad, 2.0, 10.0, bad, 2.5]
    ref = ReferenceZClip(warmup_steps=3, max_norm=5.0)
    state = zclip_init(3, dtype=torch.float64)
    for g in seq:
        before = state
        state, thr, z, spike = zclip_update(state, torch.tensor(g, dtype=torch.float64), max_norm=5.0)
        assert all(torch.isfinite(t).all() for t in state)
        if not math.isfinite(g):
            for a, b in zip(before, state):
                assert torch.equal(a, b)
            assert not spike.item()
            if ref.mean is None:
                assert thr.item() == 5.0
            else:
                assert thr.item() == pytest.approx(min(ref.mean + 2.5 * math.sqrt(ref.var), 5.0))
            continue
        r_thr, _, r_spike = ref.step(g)
        assert thr.item() == pytest.approx(r_thr, rel=1e-12) and spike.item() == r_spike
    assert int(state.count) == 6


def test_zclip_state_and_validation():
    state = zclip_init(4)
    assert isinstance(state, ZClipState) and state.buffer.shape == (4,) and state.count == 0
    with pytest.raises(ValueError, match="`warmup_steps`"):
        zclip_init(0)
    with pytest.raises(ValueError, match="`mode`"):
        zclip_update(state, torch.tensor(1.0), mode="median")
    with pytest.raises(ValueError, match="`clip_option`"):
        zclip_update(state, torch.tensor(1.0), clip_option="max")
    # pure: the input state is not modified
    new, *_ = zclip_update(state, torch.tensor(3.0))
    assert int(state.count) == 0 and state.buffer.tolist() == [0.0] * 4 and new.buffer[0].item() == 3.0


# --------------------------------------------------------------------- finiteness known on the host
def _with_nonfinite(norms: list[float], seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.choice([float("nan"), INF]) if rng.random() < 0.08 else n for n in norms]


def _same(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("known", ["always", "sometimes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_zclip_with_finiteness_known_on_the_host_is_bit_identical(cfg, dtype, known):
    # finite=True/False lets the update branch on the host (the phase too, while every step's
    # finiteness was known); the result must be the device path's, bit for bit, NaN included.
    kwargs = {k: v for k, v in cfg.items() if k != "warmup_steps"}
    device = host = zclip_init(cfg.get("warmup_steps", 25), dtype=dtype)
    rng, all_known = random.Random(7), True
    for g in _with_nonfinite(spiky_norms(3), seed=len(str(cfg))):
        norm = torch.tensor(g, dtype=dtype)
        finite = math.isfinite(g) if known == "always" or rng.random() < 0.5 else None
        all_known &= finite is not None
        device, *out_device = zclip_update(device, norm, **kwargs)
        host, *out_host = zclip_update(host, norm, finite=finite, **kwargs)
        for a, b in zip([*out_device, *device], [*out_host, *host]):
            _same(a, b)
        assert isinstance(device.count, torch.Tensor)
        assert isinstance(host.count, int) == all_known


@pytest.mark.parametrize("known", ["always", "sometimes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 100.0])
@pytest.mark.parametrize("history_size", [None, 1, 5])
def test_autoclip_with_finiteness_known_on_the_host_is_bit_identical(history_size, percentile, dtype, known):
    rng, all_known = random.Random(8), True
    device = host = autoclip_init(history_size, dtype=dtype, capacity=4)  # grows while the test runs
    for g in _with_nonfinite(spiky_norms(4, n=40), seed=9):
        norm = torch.tensor(g, dtype=dtype)
        finite = math.isfinite(g) if known == "always" or rng.random() < 0.5 else None
        all_known &= finite is not None
        device, t_device = autoclip_update(device, norm, percentile, history_size)
        host, t_host = autoclip_update(host, norm, percentile, history_size, finite=finite)
        _same(t_device, t_host)
        _same(device.history, host.history)
        _same(device.count, host.count)
        assert device.steps == host.steps
        assert isinstance(host.count, int) == all_known


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
def test_zclip_on_the_host_is_the_reference_bit_for_bit_with_no_kernel(cfg):
    # A norm the caller has read (a Python float) updates a host state in float64, in the reference's
    # own order of operations: the same numbers exactly, and no torch call at all.
    ref = ReferenceZClip(**cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "warmup_steps"}
    state = zclip_init(cfg.get("warmup_steps", 25), on_host=True)
    spikes, mode = 0, _TorchCalls()
    for g in spiky_norms(len(str(cfg))):
        with mode:
            state, thr, z, spike = zclip_update(state, g, **kwargs)
        assert (thr, z, spike) == ref.step(g)
        spikes += spike
        if ref.mean is not None:
            assert (state.mean, state.var) == (ref.mean, ref.var)
    assert mode.calls == 0
    assert state.on_host and state.spikes == spikes > 0 and isinstance(state.count, int)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_zclip_on_the_host_is_the_zclip_package_bit_for_bit(cfg):
    # The published implementation itself (bluorion-com/ZClip, `zclip` on PyPI), fed the same norms.
    zclip = pytest.importorskip("zclip")

    class Fed(zclip.ZClip):
        def _compute_grad_norm(self, model):
            return self.norm

        def apply_in_place_clipping(self, pl_module, global_norm, max_global_norm):
            self.threshold = max_global_norm  # the threshold in force; its own scaling adds an epsilon

    kwargs = {k: v for k, v in cfg.items() if k != "warmup_steps"}
    package = Fed(warmup_steps=cfg.get("warmup_steps", 25),
                  **{("max_grad_norm" if k == "max_norm" else k): v for k, v in kwargs.items()})  # fmt: skip
    model = torch.nn.Linear(2, 2)  # its warm-up clips a model's gradients: give it one
    state = zclip_init(cfg.get("warmup_steps", 25), on_host=True)
    for g in spiky_norms(len(str(cfg)) + 1):
        package.norm, package.threshold = g, None
        package.step(model)
        state, thr, _, _ = zclip_update(state, g, **kwargs)
        if package.initialized and package.threshold is not None:
            assert thr == package.threshold
        if package.initialized:
            assert (state.mean, state.var) == (package.mean, package.var)


@pytest.mark.parametrize("history_size", [None, 1, 5])
@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 100.0])
def test_autoclip_on_the_host_matches_numpy_and_the_device_form(percentile, history_size):
    norms = _with_nonfinite(spiky_norms(5, n=150), seed=10)
    host = autoclip_init(history_size, on_host=True, capacity=4)
    device = autoclip_init(history_size, dtype=torch.float64, capacity=4)
    finite, mode = [], _TorchCalls()
    for g in norms:
        with mode:
            host, thr = autoclip_update(host, g, percentile, history_size)
        device, thr_device = autoclip_update(device, torch.tensor(g, dtype=torch.float64), percentile, history_size)
        finite += [g] if math.isfinite(g) else []
        hist = finite if history_size is None else finite[-history_size:]
        assert isinstance(thr, float)
        assert thr == pytest.approx(float(np.percentile(hist, percentile)), rel=1e-12)
        assert thr == thr_device.item()  # float64 on both sides, the same operations
        assert host.history == tuple(device.history.tolist()) and host.count == int(device.count)
    assert mode.calls == 0


def test_host_state_records_nothing_for_a_norm_it_must_not_count():
    # nonfinite="zero": the zeroed gradients' finite norm is clipped against but kept out of the statistics
    z = zclip_init(2, on_host=True)
    for g in (1.0, 2.0, 2.0):
        z, *_ = zclip_update(z, g, max_norm=None)
    before = z
    z, thr, score, spike = zclip_update(z, 50.0, max_norm=None, finite=False)
    assert z == before and not spike and thr == pytest.approx(before.mean + 2.5 * before.var**0.5)
    assert math.isnan(score)  # not a sample of the statistics: no z-score
    a, _ = autoclip_update(autoclip_init(on_host=True), 3.0)
    b, thr = autoclip_update(a, 1.0, finite=False)
    assert b.history == a.history and b.count == 1 and b.steps == 2 and thr == 3.0


def test_states_move_between_host_and_device_and_refuse_the_other_form():
    z = zclip_init(3, dtype=torch.float64)
    for g in (1.0, 2.0, 4.0, 3.0):
        z, *_ = zclip_update(z, torch.tensor(g, dtype=torch.float64))
    host = z.to_host()
    assert host.on_host and isinstance(host.buffer, tuple) and isinstance(host.spikes, int)
    back = host.to_device(dtype=torch.float64)
    for a, b in zip(z, back):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    with pytest.raises(TypeError, match=r"state.to_host\(\)"):
        zclip_update(z, 2.0)
    with pytest.raises(TypeError, match=r"state.to_device"):
        zclip_update(host, torch.tensor(2.0))
    a = autoclip_init(3)
    a, _ = autoclip_update(a, torch.tensor(2.0), history_size=3)
    assert a.to_host().history == (2.0, math.inf, math.inf)
    with pytest.raises(TypeError, match=r"state.to_host\(\)"):
        autoclip_update(a, 2.0, history_size=3)
    with pytest.raises(TypeError, match="`norm`"):
        autoclip_update(a.to_host(), "2.0", history_size=3)


def test_finite_must_be_a_flag():
    with pytest.raises(TypeError, match="`finite`"):
        zclip_update(zclip_init(2), torch.tensor(1.0), finite=1)
    with pytest.raises(TypeError, match="`finite`"):
        autoclip_update(autoclip_init(), torch.tensor(1.0), finite="yes")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_updates_do_not_sync_on_cuda():
    dev = torch.device("cuda")
    a, z = autoclip_init(None, device=dev, capacity=2), zclip_init(3, device=dev)
    w, g = torch.randn(8, 4, device=dev), torch.randn(8, 4, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(6):
            norm = torch.linalg.vector_norm(g) * (i + 1)
            a, t1 = autoclip_update(a, norm)
            z, t2, _, _ = zclip_update(z, norm)
            coefs, _ = agc_coefficients(unitwise_norms([g]), unitwise_norms([w]))
            scale_units_([g], coefs)
            threshold_coefficient(t1, norm), threshold_coefficient(t2, norm)
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
