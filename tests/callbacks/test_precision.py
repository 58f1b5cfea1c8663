"""Clipping under every precision Lightning offers, in a real Trainer on CPU.

* ``16-mixed`` with a loss scaler: the callback sees unscaled gradients and clips them; an overflow
  step is the scaler's to skip (no crash, even with ``nonfinite="error"``; counted once in
  ``nonfinite_steps``; weights and Adam state untouched; the scale backs off).
* A fused optimizer under a loss scaler unscales inside ``step()``, after the hook: the rule acts on
  the true gradients (their norms divided by the scale, or unscaled first for a rule on values) and
  the run equals the non-fused one. Without a scaler (``bf16-mixed``) it clips normally.
* ``bf16-mixed``: float32 gradients, clipped exactly.
* ``16-true`` / ``bf16-true``: half-precision gradients whose norm is accumulated in float32, so a
  norm beyond float16's range (65504) is measured, not mistaken for an overflow.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from gradclip_plugin import AdaptiveGradientClipping, AutoClip, ClipByGlobalNorm, ClipByNorm, ClipByValue, GradientNormMonitor, ZClip
from helpers import TinyModel, make_loader, make_trainer, probe_around, nonfinite_steps

from .test_clip import read_metrics

INIT_SCALE = 2.0**8
BAD_STEP = 2
STEPS = 4
MAX_NORM = 0.5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads.values()])


def scaler_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))


class OverflowModel(TinyModel):
    """TinyModel on unit-scale data whose loss is infinite at ``BAD_STEP``: the scaled gradients overflow."""

    def __init__(self, bad_steps=(BAD_STEP,), **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_steps = bad_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.global_step in self.bad_steps else loss


class Weights(Callback):
    """Copies of the weights before training (entry 0) and after each batch (entry ``step + 1``)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.on_train_batch_end(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def fit_with(tmp_path, cb, model, loader=None, callbacks_before=(), **kwargs):
    before, after, callbacks = probe_around(cb)
    weights = Weights()
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [*callbacks_before, *callbacks, weights], logger=logger, max_steps=STEPS, **kwargs)
    trainer.fit(model, loader if loader is not None else make_loader(scale=1.0))
    return trainer, before, after, weights, read_metrics(logger)


def assert_clipped_by_global_norm(before: dict, after: dict, max_norm: float) -> float:
    """``after == before * min(1, max_norm / ||before||)``, the norm taken in float64; returns the norm."""
    norm = torch.linalg.vector_norm(flat(before)).item()
    coef = min(1.0, max_norm / norm)
    for name, g in before.items():
        torch.testing.assert_close(after[name], (g.double() * coef).to(g.dtype))
    return norm


# ---------------------------------------------------------------------- 16-mixed with a loss scaler
@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_16_mixed_overflow_step_is_the_scalers_to_skip(tmp_path, nonfinite):
    cb = ClipByGlobalNorm(MAX_NORM, nonfinite=nonfinite)
    model = OverflowModel(optimizer="adam")
    plugin = scaler_plugin()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, before, after, weights, metrics = fit_with(tmp_path, cb, model, plugins=[plugin])

    assert trainer.global_step == STEPS  # no crash: training went on
    assert not [w for w in record if "non-finite" in str(w.message)]  # the scaler's skip, not the callback's
    # one back-off (x0.5) for the one overflow step, no growth (growth_interval is 2000 steps)
    assert plugin.scaler.get_scale() == INIT_SCALE * 0.5
    # the step itself did not happen: weights and Adam's step counter untouched
    for name in weights.steps[0]:
        assert torch.equal(weights.steps[BAD_STEP + 1][name], weights.steps[BAD_STEP][name])
    optimizer = trainer.optimizers[0]
    assert all(int(optimizer.state[p]["step"]) == STEPS - 1 for p in model.parameters())
    # counted once, on the device, not a second time by the callback's own policy
    assert nonfinite_steps(cb) == {0: 1.0}
    assert metrics["grad_clip/nonfinite_steps"] == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    assert not torch.isfinite(flat(before.steps[BAD_STEP])).all()
    # the other steps were clipped as usual
    for step in set(range(STEPS)) - {BAD_STEP}:
        norm = assert_clipped_by_global_norm(before.steps[step], after.steps[step], MAX_NORM)
        assert norm > MAX_NORM
        torch.testing.assert_close(metrics["grad_clip/norm"][step], norm, rtol=1e-6, atol=0)


def test_16_mixed_callback_sees_unscaled_gradients(tmp_path):
    cb = ClipByGlobalNorm(MAX_NORM)
    model = OverflowModel(bad_steps=(), optimizer="sgd")
    loader = make_loader(scale=1.0)
    _, before, _, weights, metrics = fit_with(tmp_path, cb, model, loader, plugins=[scaler_plugin()])

    # reference: the first step's gradients recomputed under the same autocast, without a scaler
    ref = TinyModel()
    ref.load_state_dict({n: w for n, w in weights.steps[0].items()})
    x, y = next(iter(loader))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(ref(x), y)
    loss.backward()
    for name, p in ref.named_parameters():
        # the scaled gradients would be INIT_SCALE = 256 times larger
        torch.testing.assert_close(before.steps[0][name], p.grad, rtol=1e-3, atol=1e-5)
    norm = torch.linalg.vector_norm(flat({n: p.grad for n, p in ref.named_parameters()})).item()
    torch.testing.assert_close(metrics["grad_clip/norm"][0], norm, rtol=1e-3, atol=0)


@pytest.mark.parametrize("make_cb", [lambda: ClipByNorm(MAX_NORM), lambda: ClipByValue(0.01)], ids=["norm", "value"])
def test_16_mixed_other_rules_skip_overflow_without_crashing(tmp_path, make_cb):
    cb = make_cb()
    plugin = scaler_plugin()
    trainer, before, after, weights, _ = fit_with(tmp_path, cb, OverflowModel(optimizer="adam"), plugins=[plugin])
    assert trainer.global_step == STEPS
    assert plugin.scaler.get_scale() == INIT_SCALE * 0.5
    assert nonfinite_steps(cb) == {0: 1.0}
    for name in weights.steps[0]:
        assert torch.equal(weights.steps[BAD_STEP + 1][name], weights.steps[BAD_STEP][name])


# ---------------------------------------------------------------------- fused optimizers
class FusedAdamModel(TinyModel):
    def __init__(self, fused: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fused = fused

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)


class ScaleProbe(Callback):
    """The loss scale at each step (the gradients a fused optimizer's hook sees are multiplied by it)."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


@pytest.mark.parametrize(
    "make_cb",
    [lambda: ClipByGlobalNorm(MAX_NORM), lambda: ClipByNorm(0.2), lambda: ClipByValue(0.05),
     lambda: AdaptiveGradientClipping(0.01), lambda: AutoClip(), lambda: ZClip(warmup_steps=2),
     lambda: ClipByGlobalNorm(MAX_NORM, skip_above=2.5)],
    ids=["global", "per-tensor", "value", "agc", "autoclip", "zclip", "skip_above"],
)
def test_a_fused_optimizer_under_a_loss_scaler_is_clipped_on_its_true_gradients(tmp_path, make_cb):
    # Adam(fused=True) unscales inside step(), after the hook: the hook sees scaled gradients. The rule acts
    # on the true ones, and the run equals the same run with the non-fused Adam (unscaled before the hook),
    # overflow step included (the scaler's to skip).
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        cb, scales = make_cb(), ScaleProbe()
        model = _with_overflow(FusedAdamModel(fused=fused))
        trainer, before, after, weights, metrics = fit_with(tmp_path / str(fused), cb, model, plugins=[scaler_plugin()],
                                                            callbacks_before=[scales])
        runs[fused] = (before, weights.steps, metrics, scales.scales)
    (fb, fw, fm, scales), (rb, rw, rm, _) = runs[True], runs[False]
    for step in range(STEPS):
        if step != BAD_STEP:  # the fused run's hook saw the gradients times the loss scale
            torch.testing.assert_close(flat(fb.steps[step]) / scales[step], flat(rb.steps[step]), rtol=1e-6, atol=1e-9)
        for name in fw[step + 1]:
            torch.testing.assert_close(fw[step + 1][name], rw[step + 1][name], rtol=1e-5, atol=1e-7)
    assert fm["grad_clip/norm"] == pytest.approx(rm["grad_clip/norm"], rel=1e-5)
    assert fm["grad_clip/clip_rate"] == pytest.approx(rm["grad_clip/clip_rate"])
    assert max(fm["grad_clip/clip_rate"].values()) == 1.0  # it clipped
    if cb.skip_above is not None:  # a step skipped by the rule, another stepped: as with the non-fused optimizer
        assert fm["grad_clip/skipped_steps"] == rm["grad_clip/skipped_steps"]
        assert 0 < fm["grad_clip/skipped_steps"][STEPS - 1] < STEPS - 1
    assert fm["grad_clip/nonfinite_steps"][STEPS - 1] == rm["grad_clip/nonfinite_steps"][STEPS - 1] == 1.0
    assert all(torch.equal(fw[BAD_STEP][n], fw[BAD_STEP + 1][n]) for n in fw[BAD_STEP])  # the scaler skipped it
    assert not all(torch.equal(fw[0][n], fw[1][n]) for n in fw[0])


@pytest.mark.parametrize("monitor", [False, True])
def test_a_high_norm_order_of_scaled_gradients_is_taken_unscaled(tmp_path, monitor):
    # sum |S g|^12 overflows float32 at S = 2^12 (2^144) where sum |g|^12 does not: such orders unscale first
    # (the clip and the monitor alike), so the norms and weights equal the non-fused run's
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        cb = GradientNormMonitor(norm_type=12.0) if monitor else ClipByGlobalNorm(0.1, norm_type=12.0)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
        _, _, _, weights, metrics = fit_with(tmp_path / str(fused), cb, FusedAdamModel(fused=fused), plugins=[plugin])
        runs[fused] = weights.steps, metrics
    (fw, fm), (rw, rm) = runs[True], runs[False]
    key = "grad_norm/total" if monitor else "grad_clip/norm"
    assert len(rm[key]) == STEPS and all(math.isfinite(v) for v in rm[key].values())
    assert fm[key] == pytest.approx(rm[key], rel=1e-5)
    for step in range(1, STEPS + 1):
        for name in fw[step]:
            torch.testing.assert_close(fw[step][name], rw[step][name], rtol=1e-5, atol=1e-7)


def _with_overflow(model):
    class Overflowing(type(model)):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.inf if self.global_step == BAD_STEP else loss

    model.__class__ = Overflowing
    return model


def test_fused_optimizer_without_a_scaler_clips(tmp_path):
    cb = ClipByGlobalNorm(MAX_NORM)
    trainer, before, after, _, _ = fit_with(tmp_path, cb, FusedAdamModel(), make_loader(), precision="bf16-mixed")
    assert trainer.global_step == STEPS
    for b, a in zip(before.steps, after.steps):
        assert assert_clipped_by_global_norm(b, a, MAX_NORM) > MAX_NORM


# ---------------------------------------------------------------------- bf16-mixed
def test_bf16_mixed_clips_float32_gradients(tmp_path):
    cb = ClipByGlobalNorm(MAX_NORM)
    _, before, after, _, metrics = fit_with(tmp_path, cb, TinyModel(), make_loader(), precision="bf16-mixed")
    assert nonfinite_steps(cb) == {0: 0.0}
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        assert all(g.dtype == torch.float32 for g in b.values())
        norm = assert_clipped_by_global_norm(b, a, MAX_NORM)
        assert norm > MAX_NORM
        torch.testing.assert_close(metrics["grad_clip/norm"][step], norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(metrics["grad_clip/norm_clipped"][step], MAX_NORM, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- 16-true / bf16-true
GRAD = 40000.0  # representable in float16 (max 65504); four such entries have norm 80000, beyond it


class HalfGradModel(TinyModel):
    """A 2x2 weight whose gradient is ``GRAD`` in every entry: the loss is taken in float32."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd")
        self.w = nn.Parameter(torch.zeros(2, 2))

    def training_step(self, batch, batch_idx):
        small = super().training_step(batch, batch_idx).float() * 1e-3
        return small + (self.w.float() * GRAD).sum()


@pytest.mark.parametrize("precision,dtype", [("16-true", torch.float16), ("bf16-true", torch.bfloat16)])
def test_half_precision_gradients_have_float32_norms(tmp_path, precision, dtype):
    cb = ClipByGlobalNorm(MAX_NORM)
    _, before, after, weights, metrics = fit_with(tmp_path, cb, HalfGradModel(), make_loader(scale=0.1), precision=precision)
    assert nonfinite_steps(cb) == {0: 0.0}  # nothing mistaken for an overflow
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        assert all(g.dtype == dtype for g in b.values())
        assert torch.equal(b["w"], torch.full((2, 2), GRAD, dtype=dtype))
        norm = torch.linalg.vector_norm(flat(b)).item()  # float64 reference
        assert norm > torch.finfo(torch.float16).max
        # torch's own total norm, accumulated in the gradients' dtype, overflows in float16
        if dtype == torch.float16:
            assert torch.isinf(torch.nn.utils.get_total_norm(list(b.values())))
        torch.testing.assert_close(metrics["grad_clip/norm"][step], norm, rtol=1e-6, atol=0)
        coef = MAX_NORM / norm
        for name, g in b.items():
            torch.testing.assert_close(a[name], (g.double() * coef).to(dtype), rtol=1e-2, atol=1e-6)
        assert not torch.equal(weights.steps[step + 1]["w"], weights.steps[step]["w"])


def test_16_mixed_overflow_step_is_left_out_of_the_clip_rate(tmp_path):
    # One window of 4 steps (log_every_n_steps=4): steps 0, 1, 3 are finite and clipped (max_norm tiny),
    # step 2 overflows and is the scaler's to skip. The rate is over the finite steps: 3/3, not 3/4.
    cb = ClipByGlobalNorm(1e-6)
    trainer, before, _, _, metrics = fit_with(
        tmp_path, cb, OverflowModel(optimizer="adam"), plugins=[scaler_plugin()], log_every_n_steps=4
    )
    finite = [bool(torch.isfinite(flat(step)).all()) for step in before.steps]
    assert finite == [True, True, False, True]
    assert metrics["grad_clip/clip_rate"] == {3: 1.0}
    assert metrics["grad_clip/nonfinite_steps"] == {3: 1.0}
