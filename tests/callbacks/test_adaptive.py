"""AdaptiveGradientClipping, AutoClip and ZClip in a real Trainer.

The model's gradients are a scale ``s_t`` (a synthetic norm sequence with spikes, NaN where asked)
times gradients that do not depend on the weights, so the sequence of norms is known in advance
and survives NaN weights. Probes before and after the callback capture the gradients; each test
recomputes, step by step from the probed pre-clip gradients, what the paper's rule gives (float64,
written independently here or in ``tests/functional/test_adaptive.py``) and compares it with what
the optimizer received.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from functional.test_adaptive import ReferenceZClip, direct_agc
from gradclip_plugin.callbacks.adaptive import AdaGC, AdaptiveGradientClipping, AutoClip, ZClip
from gradclip_plugin.callbacks.clip import ClipByValue
from gradclip_plugin.callbacks.spikes import SkipSpikes
from gradclip_plugin.functional import ZClipState
from helpers import GradProbe, TinyModel, TwoOptimizerModel, make_loader, make_trainer

INF = float("inf")
NAN = float("nan")
REPO = Path(__file__).resolve().parents[2]
# a norm sequence with spikes (x8 at step 5, x30 at 9, x6 at 14) and small wobble elsewhere
SCALES = [1.0, 1.2, 0.9, 1.1, 1.0, 8.0, 1.05, 0.95, 1.1, 30.0, 1.0, 0.9, 1.2, 1.0, 6.0, 1.0]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def selects(name: str, include: list[str], exclude: list[str]) -> bool:
    """The documented selection rule: an `include` pattern matches (if any are given) and no `exclude` one."""
    from fnmatch import fnmatchcase

    return (not include or any(fnmatchcase(name, p) for p in include)) and not any(fnmatchcase(name, p) for p in exclude)


class SpikeModel(pl.LightningModule):
    """``loss = s_t * (sum(conv(x)) + sum(lin(v)))`` on fixed inputs: gradients ``s_t * const``.

    ``lin.bias`` is zero-initialised (AGC's limit is then ``clip_factor * eps``). The batch is
    ignored, so the gradients depend on the global step only and a resumed run sees the same ones.
    """

    def __init__(self, scales=SCALES, nan_steps=(), lr: float = 0.01):
        super().__init__()
        self.scales, self.nan_steps, self.lr = list(scales), set(nan_steps), lr
        self.conv = nn.Conv2d(2, 3, 3)
        self.lin = nn.Linear(4, 3)
        nn.init.zeros_(self.lin.bias)
        g = torch.Generator().manual_seed(1)
        self.register_buffer("img", torch.randn(1, 2, 4, 4, generator=g))
        self.register_buffer("vec", torch.randn(2, 4, generator=g))

    def training_step(self, batch, batch_idx):
        step = self.global_step
        s = NAN if step in self.nan_steps else self.scales[step]
        return s * (self.conv(self.img).sum() + self.lin(self.vec).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ParamGradProbe(GradProbe):
    """A GradProbe that also records the parameters' values (AGC's limits depend on them)."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def norm64(grads) -> float:
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()


def run(tmp_path, cb, model=None, max_steps=len(SCALES), logger=None, ckpt_path=None, **kwargs):
    before, after = ParamGradProbe(), ParamGradProbe()
    trainer = make_trainer(tmp_path, [before, cb, after], max_steps=max_steps, logger=logger or False, **kwargs)
    trainer.fit(model if model is not None else SpikeModel(), make_loader(), ckpt_path=ckpt_path)
    return trainer, before, after


def read_metrics(logger: CSVLogger) -> dict[str, dict[int, float]]:
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row.pop("step"))
        for key, value in row.items():
            if value != "":
                out.setdefault(key, {})[step] = float(value)
    return out


# ---------------------------------------------------------------------- step-by-step references
class AutoClipReference:
    """Seetharaman et al. 2020: append the norm, clip to numpy.percentile of the (recent) history."""

    def __init__(self, percentile: float, history_size: Optional[int]):
        self.p, self.k, self.history = percentile, history_size, []

    def threshold(self, g: float) -> float:
        if math.isfinite(g):
            self.history.append(g)
        hist = self.history if self.k is None else self.history[-self.k :]
        return float(np.percentile(hist, self.p)) if hist else INF


class ZClipReference:
    def __init__(self, cb: ZClip):
        self.ref = ReferenceZClip(
            alpha=cb.alpha, z_thresh=cb.z_thresh, max_norm=cb.max_norm, eps=cb.eps, warmup_steps=cb.warmup_steps,
            mode=cb.mode, clip_option=cb.clip_option, clip_factor=cb.clip_factor,
            skip_update_on_spike=cb.skip_update_on_spike,
        )
        self.z = 0.0

    def threshold(self, g: float) -> float:
        if not math.isfinite(g):
            self.z = NAN
            r = self.ref
            cap = INF if r.max_norm is None else r.max_norm
            return cap if r.mean is None else min(r.mean + r.z_thresh * math.sqrt(r.var), cap)
        thr, self.z, _ = self.ref.step(g)
        return thr


def reference_for(cb):
    if isinstance(cb, AutoClip):
        return AutoClipReference(cb.percentile, cb.history_size)
    return ZClipReference(cb)


def expected_grads(cb, ref, before: dict[str, Tensor], params: dict[str, Tensor], stat_norm: float) -> dict[str, Tensor]:
    """What the optimizer should receive, from the probed pre-clip gradients (and weights, for AGC)."""
    if isinstance(cb, AdaptiveGradientClipping):
        selected = {n for n in before if selects(n, cb.include, cb.exclude)}
        return {
            n: (direct_agc(params[n], g, cb.clip_factor, cb.eps) if n in selected else g.double()).to(g.dtype)
            for n, g in before.items()
        }
    g = norm64(before.values())
    thr = ref.threshold(stat_norm)
    coef = 1.0 if not g > thr else thr / g
    return {n: (t.double() * coef).to(t.dtype) for n, t in before.items()}


def assert_grads_close(actual: dict[str, Optional[Tensor]], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=2e-5, atol=1e-6, equal_nan=True, msg=n)


FACTORIES = {
    # SpikeModel's gradient/weight ratio per unit is ~5 to ~15 at scale 1: these factors clip some units
    "agc": lambda **kw: AdaptiveGradientClipping(clip_factor=8.0, **kw),
    "agc-exclude": lambda **kw: AdaptiveGradientClipping(clip_factor=5.0, eps=1e-2, exclude=["lin.weight"], **kw),
    "autoclip": lambda **kw: AutoClip(percentile=10.0, **kw),
    "autoclip-window": lambda **kw: AutoClip(percentile=50.0, history_size=4, **kw),
    "zclip": lambda **kw: ZClip(warmup_steps=3, max_norm=None, **kw),
    "zclip-maxnorm": lambda **kw: ZClip(warmup_steps=4, max_norm=150.0, clip_factor=0.8, alpha=0.9, **kw),
    "zclip-mean": lambda **kw: ZClip(warmup_steps=3, max_norm=None, clip_option="mean", **kw),
    "zclip-percentile": lambda **kw: ZClip(warmup_steps=3, max_norm=None, mode="percentile", z_thresh=2.0, **kw),
    "zclip-skip-update": lambda **kw: ZClip(warmup_steps=3, max_norm=None, skip_update_on_spike=True, **kw),
}


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_each_step_equals_the_reference_on_the_probed_gradients(tmp_path, kind, nonfinite):
    cb = FACTORIES[kind](nonfinite=nonfinite)
    logger = CSVLogger(tmp_path)
    _, before, after = run(tmp_path, cb, logger=logger)
    assert len(before.steps) == len(after.steps) == len(SCALES)
    metrics = read_metrics(logger)
    ref = reference_for(cb) if not isinstance(cb, AdaptiveGradientClipping) else None
    changed = unchanged = 0
    for t, (b, a, params) in enumerate(zip(before.steps, after.steps, before.params)):
        exp = expected_grads(cb, ref, b, params, norm64(b.values()))
        assert_grads_close(a, exp)
        if isinstance(cb, AdaptiveGradientClipping):  # count units (rows; a bias is one unit)
            for n in b:
                units = b[n].shape[0] if b[n].dim() > 1 else 1
                same_rows = (a[n].reshape(units, -1) == b[n].reshape(units, -1)).all(dim=1)
                unchanged += int(same_rows.sum())
                changed += int((~same_rows).sum())
        else:
            same = all(torch.equal(a[n], b[n]) for n in b)
            changed += not same
            unchanged += same
        selected = [n for n in b if selects(n, cb.include, cb.exclude)]
        assert metrics["grad_clip/norm"][t] == pytest.approx(norm64(b[n] for n in selected), rel=1e-5)
        assert metrics["grad_clip/norm_clipped"][t] == pytest.approx(norm64(a[n] for n in selected), rel=1e-4)
        if isinstance(ref, AutoClipReference):
            hist = ref.history if ref.k is None else ref.history[-ref.k :]
            assert metrics["grad_clip/threshold"][t] == pytest.approx(float(np.percentile(hist, ref.p)), rel=1e-5)
        if isinstance(ref, ZClipReference):
            assert metrics["grad_clip/z"][t] == pytest.approx(ref.z, rel=1e-4, abs=1e-5)
    # every branch is exercised (AutoClip at the 10th percentile clips every step but the first)
    assert changed and unchanged, f"{changed} clipped, {unchanged} untouched: a weak test"
    if isinstance(cb, ZClip):
        assert metrics["grad_clip/spikes"][len(SCALES) - 1] == cb._states[0].spikes > 0
        assert 0 < cb._states[0].spikes < len(SCALES) - cb.warmup_steps


def test_agc_zero_initialised_bias_is_clipped_to_clip_factor_times_eps(tmp_path):
    cb = AdaptiveGradientClipping(clip_factor=0.01, eps=1e-3)
    _, before, after = run(tmp_path, cb, max_steps=1)
    assert torch.count_nonzero(before.params[0]["lin.bias"]) == 0
    # lin.bias gradient is 2 per entry (two rows of `vec`), norm 2*sqrt(3), limit 0.01 * 1e-3
    torch.testing.assert_close(before.steps[0]["lin.bias"], torch.full((3,), 2.0))
    torch.testing.assert_close(torch.linalg.vector_norm(after.steps[0]["lin.bias"]), torch.tensor(1e-5))


# ---------------------------------------------------------------------- NaN in the middle of a run
NAN_CASES = [(k, p) for k in ("autoclip", "autoclip-window", "zclip-maxnorm") for p in ("skip", "zero", "ignore")]
NAN_CASES += [("zclip-percentile", "zero"), ("zclip", "ignore")]


@pytest.mark.parametrize("kind,nonfinite", NAN_CASES)
def test_a_nan_step_never_enters_the_statistics(tmp_path, kind, nonfinite):
    cb = FACTORIES[kind](nonfinite=nonfinite)
    nan_steps = (2, 7)  # one during ZClip's warm-up, one after
    with pytest.warns(UserWarning, match="non-finite") if nonfinite != "ignore" else _no_warning():
        _, before, after = run(tmp_path, cb, model=SpikeModel(nan_steps=nan_steps))
    ref = reference_for(cb)
    for t, (b, a) in enumerate(zip(before.steps, after.steps)):
        g = norm64(b.values())
        assert math.isfinite(g) == (t not in nan_steps)
        if t in nan_steps and nonfinite == "skip":
            assert all(v is None for v in a.values())
            continue
        if t in nan_steps and nonfinite == "zero":
            b = {n: torch.nan_to_num(v, nan=0.0) for n, v in b.items()}  # every entry NaN: all zero
        assert_grads_close(a, expected_grads(cb, ref, b, {}, g))
    state = cb._states[0]
    if isinstance(cb, AutoClip):  # only the finite norms were recorded
        assert all(math.isfinite(v) for v in state.history)
        assert state.history == pytest.approx(ref.history if ref.k is None else ref.history[-ref.k :], rel=1e-6)
    else:
        assert math.isfinite(state.mean) and math.isfinite(state.var), state
        assert state.mean == pytest.approx(ref.ref.mean, rel=1e-6)
        assert state.var == pytest.approx(ref.ref.var, rel=1e-5)


@contextlib.contextmanager
def _no_warning():
    """Fails if a warning about non-finite gradients is shown inside."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    assert not [str(w.message) for w in record if "non-finite" in str(w.message)]


# ---------------------------------------------------------------------- checkpoint and resume
# saved after ZClip's warm-up (6), and in the middle of it (2: `zclip-maxnorm` warms up for 4 steps)
RESUME_CASES = [("agc", 6), ("autoclip", 6), ("autoclip-window", 6), ("zclip", 6), ("zclip-maxnorm", 2)]


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("kind,save_at", RESUME_CASES)
def test_resumed_run_clips_exactly_as_the_uninterrupted_run(tmp_path, kind, save_at, nonfinite):
    _, _, full = run(tmp_path / "full", FACTORIES[kind](nonfinite=nonfinite))

    torch.manual_seed(0)
    trainer, _, _ = run(tmp_path / "first", FACTORIES[kind](nonfinite=nonfinite), max_steps=save_at)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    cb = FACTORIES[kind](nonfinite=nonfinite)
    _, _, resumed = run(tmp_path / "resumed", cb, ckpt_path=path)
    assert len(resumed.steps) == len(SCALES) - save_at
    for t, step in enumerate(resumed.steps, start=save_at):
        for n, g in step.items():
            assert torch.equal(g, full.steps[t][n]), f"step {t}, {n}"

    if isinstance(cb, AdaptiveGradientClipping):
        return
    # the comparison can fail: without the saved state the same resume clips differently
    ckpt = torch.load(path, weights_only=False)
    assert cb.state_key in ckpt["callbacks"]
    del ckpt["callbacks"][cb.state_key]
    torch.save(ckpt, tmp_path / "stateless.ckpt")
    _, _, fresh = run(tmp_path / "fresh", FACTORIES[kind](nonfinite=nonfinite), ckpt_path=tmp_path / "stateless.ckpt")
    assert any(
        not torch.equal(g, full.steps[t][n]) for t, step in enumerate(fresh.steps, start=save_at) for n, g in step.items()
    )


@pytest.mark.parametrize("kind", ["autoclip", "autoclip-window", "zclip"])
def test_a_run_resumed_under_a_loss_scaler_goes_on_from_the_saved_statistics(tmp_path, kind):
    # Saved by a float32 run, resumed under a 16-mixed loss scaler: same callback, same state key.
    from pytorch_lightning.plugins.precision import MixedPrecision

    trainer, first, _ = run(tmp_path / "first", FACTORIES[kind](), max_steps=6)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    cb = FACTORIES[kind]()
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    _, before, after = run(tmp_path / "resumed", cb, ckpt_path=path, plugins=[scaler])
    ref = reference_for(cb)
    for b in first.steps:
        ref.threshold(norm64(b.values()))
    for b, a in zip(before.steps, after.steps):
        assert_grads_close(a, expected_grads(cb, ref, b, {}, norm64(b.values())))


def test_state_dict_round_trip(tmp_path):
    cb = ZClip(warmup_steps=3, max_norm=None, skip_step_z_thresh=20.0)
    run(tmp_path, cb, max_steps=10)
    saved = cb.state_dict()
    assert set(saved) == {"tallies", "states"}
    assert set(saved["states"][0]) == set(ZClipState._fields)
    fresh = ZClip(warmup_steps=3, max_norm=None, skip_step_z_thresh=20.0)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved and saved["tallies"][0]["skipped"] == 2
    assert fresh._states[0] == cb._states[0]


def checkpoint_after(tmp_path, callbacks, steps: int = 6):
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps)
    trainer.fit(SpikeModel(), make_loader())
    path = tmp_path / f"after{steps}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "resumed",
    [
        lambda: [AutoClip(), ClipByValue(1e9)],  # a clipping callback added, sharing the default prefix
        lambda: [AutoClip(percentile=20.0)],  # a threshold argument changed
        lambda: [ClipByValue(1e9), AutoClip(percentile=20.0, exclude=["conv.bias"])],
    ],
    ids=["callback-added", "percentile-changed", "both"],
)
def test_a_resume_with_other_callbacks_or_thresholds_restores_the_statistics(tmp_path, resumed):
    saved = AutoClip()
    path = checkpoint_after(tmp_path, [saved])
    callbacks = resumed()
    cb = next(c for c in callbacks if isinstance(c, AutoClip))
    make_trainer(tmp_path, callbacks, max_steps=7).fit(SpikeModel(), make_loader(), ckpt_path=path)
    assert len(cb._states[0].history) == 7  # the six saved norms and the resumed step's
    assert cb._states[0].history[:6] == saved._states[0].history


def test_a_saved_state_that_does_not_fit_is_warned_about_and_started_afresh(tmp_path):
    path = checkpoint_after(tmp_path, [ZClip(warmup_steps=3)])
    ckpt = torch.load(path, weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("ZClip")]
    ckpt["callbacks"][key]["states"][0] = {"buffer": [1.0], "count": 3}  # another version's fields
    torch.save(ckpt, path)
    cb = ZClip(warmup_steps=3)
    with pytest.warns(UserWarning, match=r"ZClip: the checkpoint's state for optimizer 0 does not fit a ZClipState"):
        make_trainer(tmp_path, [cb], max_steps=7).fit(SpikeModel(), make_loader(), ckpt_path=path)
    assert len(cb._states[0].buffer) == 1 and cb._states[0].mean is None  # a fresh warm-up, one norm in


def test_a_checkpoint_without_the_callbacks_state_is_warned_about(tmp_path):
    path = checkpoint_after(tmp_path, [ClipByValue(1e9)])
    with pytest.warns(UserWarning, match=r"AutoClip: the checkpoint holds no state for .*start afresh"):
        make_trainer(tmp_path, [AutoClip()], max_steps=7).fit(SpikeModel(), make_loader(), ckpt_path=path)


class LBFGSModel(TinyModel):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


@pytest.mark.parametrize("make_cb", [AutoClip, ZClip, AdaGC, SkipSpikes], ids=["autoclip", "zclip", "adagc", "skipspikes"])
def test_closure_optimizers_are_refused_by_the_history_rules_saying_why(tmp_path, make_cb):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=r"`LBFGS` evaluates its closure, and so this hook, several"):
        make_trainer(tmp_path, [make_cb()], max_steps=2).fit(LBFGSModel(), make_loader())


def test_two_instances_keep_separate_state_in_one_checkpoint(tmp_path):
    conv, lin = AutoClip(percentile=30.0, include=["conv.*"]), AutoClip(percentile=30.0, include=["lin.*"])
    assert conv.state_key != lin.state_key
    trainer = make_trainer(tmp_path, [conv, lin], max_steps=5)
    trainer.fit(SpikeModel(), make_loader())
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert {conv.state_key, lin.state_key} <= set(ckpt["callbacks"])
    assert conv._states[0].history != lin._states[0].history  # on the host: tuples
    conv2, lin2 = AutoClip(percentile=30.0, include=["conv.*"]), AutoClip(percentile=30.0, include=["lin.*"])
    trainer = make_trainer(tmp_path, [conv2, lin2], max_steps=5)
    trainer.fit(SpikeModel(), make_loader(), ckpt_path=path)  # max_steps reached: restore only
    assert conv2._states[0].history == conv._states[0].history
    assert lin2._states[0].history == lin._states[0].history


# ---------------------------------------------------------------------- several optimizers
def test_each_optimizer_has_its_own_history(tmp_path):
    cb = AutoClip(percentile=50.0)
    logger = CSVLogger(tmp_path)
    before, after = GradProbe(), GradProbe()
    trainer = make_trainer(tmp_path, [before, cb, after], max_steps=16, logger=logger)  # 8 steps each
    trainer.fit(TwoOptimizerModel(), make_loader())
    metrics = read_metrics(logger)
    refs = {0: AutoClipReference(50.0, None), 1: AutoClipReference(50.0, None)}
    seen = {0: 0, 1: 0}
    for b, a, idx in zip(before.steps, after.steps, before.optimizers):
        g = norm64(b.values())
        thr = refs[idx].threshold(g)
        coef = 1.0 if g <= thr else thr / g
        assert_grads_close(a, {n: (v.double() * coef).to(v.dtype) for n, v in b.items()})
        seen[idx] += 1
    assert seen == {0: 8, 1: 8}
    for idx in (0, 1):
        assert cb._states[idx].history == pytest.approx(refs[idx].history, rel=1e-6)
        assert f"grad_clip/opt{idx}/threshold" in metrics


# ---------------------------------------------------------------------- ZClip extras
def test_zclip_skips_the_step_on_a_severe_spike_and_logs_it(tmp_path):
    z_skip = 100.0  # SpikeModel's spikes have z of about 57, 250 and 44
    cb = ZClip(warmup_steps=3, max_norm=None, skip_step_z_thresh=z_skip)
    logger = CSVLogger(tmp_path)
    _, before, after = run(tmp_path, cb, logger=logger)
    ref = ZClipReference(cb)
    skipped = []
    for t, (b, a) in enumerate(zip(before.steps, after.steps)):
        ref.threshold(norm64(b.values()))
        if ref.z > z_skip:
            skipped.append(t)
            assert all(v is None for v in a.values()), f"step {t} (z={ref.z:.1f}) should be skipped"
            # the weights did not move over the skipped step
            nxt = before.params[t + 1]
            assert all(torch.equal(nxt[n], before.params[t][n]) for n in nxt)
        else:
            assert all(v is not None for v in a.values())
    metrics = read_metrics(logger)
    spikes = cb._states[0].spikes
    assert 0 < len(skipped) < spikes, "some spikes are only clipped, the severe ones are skipped"
    assert metrics["grad_clip/skipped_steps"][len(SCALES) - 1] == len(skipped)
    assert cb.state_dict()["tallies"][0]["skipped"] == len(skipped)


def test_zclip_logs_threshold_z_and_spike_count(tmp_path):
    cb = ZClip(warmup_steps=3, max_norm=None)
    logger = CSVLogger(tmp_path)
    _, before, _ = run(tmp_path, cb, logger=logger)
    metrics = read_metrics(logger)
    ref = ZClipReference(cb)
    spikes = 0
    for t, b in enumerate(before.steps):
        thr = ref.threshold(norm64(b.values()))
        spikes += ref.z > cb.z_thresh
        if t < 3:  # warm-up with max_norm=None: no threshold, and an infinite one is not written
            assert t not in metrics["grad_clip/threshold"]
        else:
            assert metrics["grad_clip/threshold"][t] == pytest.approx(thr, rel=1e-5)
        assert metrics["grad_clip/spikes"][t] == spikes
    assert spikes == 3
    assert "grad_clip/skipped_steps" not in metrics


# ---------------------------------------------------------------------- validation
BAD_ARGS = [
    (AdaptiveGradientClipping, dict(clip_factor=0.0), "clip_factor"),
    (AdaptiveGradientClipping, dict(clip_factor=-1.0), "clip_factor"),
    (AdaptiveGradientClipping, dict(clip_factor=INF), "clip_factor"),
    (AdaptiveGradientClipping, dict(eps=0.0), "eps"),
    (AdaptiveGradientClipping, dict(eps=NAN), "eps"),
    (AdaptiveGradientClipping, dict(norm_type=0), "norm_type"),
    (AdaptiveGradientClipping, dict(nonfinite="drop"), "nonfinite"),
    (AutoClip, dict(percentile=-1.0), "percentile"),
    (AutoClip, dict(percentile=100.5), "percentile"),
    (AutoClip, dict(percentile=True), "percentile"),
    (AutoClip, dict(percentile="10"), "percentile"),
    (AutoClip, dict(history_size=0), "history_size"),
    (AutoClip, dict(history_size=2.5), "history_size"),
    (AutoClip, dict(exclude="head.*"), "exclude"),
    (ZClip, dict(alpha=0.0), "alpha"),
    (ZClip, dict(alpha=1.0), "alpha"),
    (ZClip, dict(z_thresh=0.0), "z_thresh"),
    (ZClip, dict(max_norm=-1.0), "max_norm"),
    (ZClip, dict(eps=0.0), "eps"),
    (ZClip, dict(warmup_steps=0), "warmup_steps"),
    (ZClip, dict(warmup_steps=2.0), "warmup_steps"),
    (ZClip, dict(mode="zcore"), "mode"),
    (ZClip, dict(clip_option="median"), "clip_option"),
    (ZClip, dict(clip_factor=0.0), "clip_factor"),
    (ZClip, dict(skip_update_on_spike="yes"), "skip_update_on_spike"),
    (ZClip, dict(skip_step_z_thresh=0.0), "skip_step_z_thresh"),
    (ZClip, dict(skip_step_z_thresh=2.0), "skip_step_z_thresh"),
    (ZClip, dict(log_prefix=""), "log_prefix"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD_ARGS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_ARGS])
def test_every_init_argument_is_validated(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        cls(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_refuses_trainer_gradient_clip_val(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    trainer = make_trainer(tmp_path, [ZClip()], gradient_clip_val=1.0)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        trainer.fit(SpikeModel(), make_loader())


# ---------------------------------------------------------------------- YAML configs
CONFIGS = {
    "agc.yaml": (AdaptiveGradientClipping, dict(clip_factor=0.01, eps=1e-3, exclude=["head.*"])),
    "autoclip.yaml": (AutoClip, dict(percentile=10.0, history_size=None)),
    "zclip.yaml": (ZClip, dict(alpha=0.97, z_thresh=2.5, max_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                               clip_option="adaptive_scaling", clip_factor=1.0, skip_step_z_thresh=None)),
}


def load_example_train():
    """``examples/train.py`` (the LightningCLI entry point the configs are written for)."""
    spec = importlib.util.spec_from_file_location("examples_train_adaptive", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(CONFIGS))
def test_example_config_builds_the_callback(tmp_path, monkeypatch, name):
    pytest.importorskip("jsonargparse")
    import gradclip_plugin

    cls, expected = CONFIGS[name]
    # the configs name the public export (`gradclip_plugin.ZClip`); a no-op once the package exports it
    monkeypatch.setattr(gradclip_plugin, cls.__name__, cls, raising=False)
    path = REPO / "examples" / "configs" / name
    raw = yaml.safe_load(path.read_text())
    assert [e["class_path"] for e in raw["trainer"]["callbacks"]] == [f"gradclip_plugin.{cls.__name__}"]
    cli = load_example_train().main(
        ["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False
    )
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(found) == 1
    for key, value in expected.items():
        assert getattr(found[0], key) == value, key
    if isinstance(found[0], AdaptiveGradientClipping):  # the exclude pattern names the example's classifier
        names = [n for n, _ in cli.model.named_parameters()]
        assert [n for n in names if not selects(n, found[0].include, found[0].exclude)] == ["head.weight", "head.bias"]


def test_agc_refuses_fsdp_flat_shards(tmp_path, monkeypatch):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from gradclip_plugin.callbacks import _lightning

    monkeypatch.setattr(_lightning, "flat_shard_group", lambda trainer: object())  # as under FSDPStrategy
    trainer = make_trainer(tmp_path, [AdaptiveGradientClipping()])
    with pytest.raises(MisconfigurationException, match=r"does not support sharded \(FSDP\) gradients"):
        trainer.fit(TinyModel(), make_loader())
