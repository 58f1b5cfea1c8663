"""ClipByValue, ClipByNorm and ClipByGlobalNorm in a real Trainer.

Each test puts a probe callback before and after the one under test and checks the gradients the
optimizer receives against the rule's formula applied to the probed gradients, computed here
independently in float64 with ``torch.linalg.vector_norm`` on the concatenated tensors:

* by value: ``clamp(g, -c, c)``;
* by norm (per tensor): ``g * min(1, max_norm / ||g||_p)``;
* by global norm: ``g * min(1, max_norm / ||all g||_p)``.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import re
from typing import Callable

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from gradclip_plugin import ClipByGlobalNorm, ClipByNorm, ClipByValue
from helpers import TinyModel, TwoOptimizerModel, make_loader, make_trainer, probe_around

INF = float("inf")
NAN = float("nan")
PARAM_NAMES = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------- references and plumbing
def vec_norm(tensors, norm_type: float) -> float:
    """The ``norm_type``-norm of the tensors viewed as one float64 vector."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type).item()


def coefficient(max_norm: float, norm: float) -> float:
    """``min(1, max_norm / norm)``; 1 for a zero norm."""
    return 1.0 if norm <= max_norm else max_norm / norm


def expected(cb, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rule's formula applied to ``grads`` (the selected ones), in float64, cast back."""
    if isinstance(cb, ClipByValue):
        c = cb.clip_value
        return {n: g.double().clamp(-c, c).to(g.dtype) for n, g in grads.items()}
    if isinstance(cb, ClipByNorm):
        return {
            n: (g.double() * coefficient(cb.max_norm, vec_norm([g], cb.norm_type))).to(g.dtype)
            for n, g in grads.items()
        }
    assert isinstance(cb, ClipByGlobalNorm)
    coef = coefficient(cb.max_norm, vec_norm(grads.values(), cb.norm_type))
    return {n: (g.double() * coef).to(g.dtype) for n, g in grads.items()}


def logged_norm_type(cb) -> float:
    """The norm each callback logs: ClipByValue bounds (and logs) the inf-norm."""
    return INF if isinstance(cb, ClipByValue) else cb.norm_type


def threshold_of(cb) -> float:
    return cb.clip_value if isinstance(cb, ClipByValue) else cb.max_norm


def read_metrics(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """``metrics.csv`` as ``{key: {step: value}}``; a key written twice at one step fails the test."""
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row.pop("step"))
        for key, value in row.items():
            if value != "":
                series = out.setdefault(key, {})
                assert step not in series, f"{key} written twice at step {step}"
                series[step] = float(value)
    return out


def fit(tmp_path, cb, model=None, loader=None, callbacks_after=(), **kwargs):
    """Run a short fit with probes around ``cb`` and a CSVLogger; return the probes and the metrics."""
    before, after, callbacks = probe_around(cb)
    callbacks = [*callbacks, *callbacks_after]
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, callbacks, logger=logger, **kwargs)
    trainer.fit(model if model is not None else TinyModel(), loader if loader is not None else make_loader())
    return before, after, read_metrics(logger)


def assert_close_float32(actual: float, reference: float) -> None:
    """A float32 result against a float64 reference, at float32's default tolerance."""
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float32), torch.tensor(reference, dtype=torch.float32))


# Thresholds chosen from TinyModel's gradient sizes on make_loader() (tensor 2-norms ~1 to ~100,
# entries up to ~45), so that each run clips some things and leaves others alone.
FACTORIES: dict[str, Callable] = {
    "value": lambda **kw: ClipByValue(1.0, **kw),
    "norm-1": lambda **kw: ClipByNorm(5.0, norm_type=1.0, **kw),
    "norm-2": lambda **kw: ClipByNorm(5.0, **kw),
    "norm-inf": lambda **kw: ClipByNorm(5.0, norm_type=INF, **kw),
    "global-1": lambda **kw: ClipByGlobalNorm(5.0, norm_type=1.0, **kw),
    "global-2": lambda **kw: ClipByGlobalNorm(5.0, **kw),
    "global-inf": lambda **kw: ClipByGlobalNorm(5.0, norm_type="inf", **kw),
}
BASIC = ["value", "norm-2", "global-2"]


# ---------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_gradients_equal_the_formula_on_the_probed_gradients(tmp_path, kind):
    cb = FACTORIES[kind]()
    before, after, metrics = fit(tmp_path, cb)
    assert len(before.steps) == len(after.steps) == 4
    p, threshold = logged_norm_type(cb), threshold_of(cb)
    changed = unchanged = 0
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        assert list(b) == list(a) == PARAM_NAMES
        ref = expected(cb, b)
        for name in PARAM_NAMES:
            torch.testing.assert_close(a[name], ref[name])
            if torch.equal(a[name], b[name]):
                unchanged += 1
            else:
                changed += 1
        # the logged numbers are the norms of what the probes saw, before and after
        assert_close_float32(metrics["grad_clip/norm"][step], vec_norm(b.values(), p))
        assert_close_float32(metrics["grad_clip/norm_clipped"][step], vec_norm(a.values(), p))
        assert metrics["grad_clip/threshold"][step] == threshold
        if not isinstance(cb, ClipByNorm):  # per-tensor clipping bounds each tensor, not the total
            assert metrics["grad_clip/norm_clipped"][step] <= threshold * (1 + 1e-6)
        assert metrics["grad_clip/nonfinite_steps"][step] == 0
    assert changed > 0, "the thresholds must make the callback clip something"
    if isinstance(cb, ClipByNorm):
        assert unchanged > 0, "per-tensor clipping must leave some tensor alone here"


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_post_clip_norm_never_above_the_threshold(tmp_path, kind):
    cb = FACTORIES[kind]()
    _, after, _ = fit(tmp_path, cb, max_steps=2)
    threshold = threshold_of(cb) * (1 + 1e-6)
    for a in after.steps:
        if isinstance(cb, ClipByValue):
            assert all(g.abs().max().item() <= threshold_of(cb) for g in a.values())
        elif isinstance(cb, ClipByNorm):
            assert all(vec_norm([g], cb.norm_type) <= threshold for g in a.values())
        else:
            assert vec_norm(a.values(), cb.norm_type) <= threshold


@pytest.mark.parametrize(
    "make_cb",
    [
        lambda: ClipByValue(1e6),
        lambda: ClipByNorm(1e6, norm_type=1.0),
        lambda: ClipByNorm(1e6),
        lambda: ClipByNorm(1e6, norm_type=INF),
        lambda: ClipByGlobalNorm(1e6, norm_type=1.0),
        lambda: ClipByGlobalNorm(1e6),
        lambda: ClipByGlobalNorm(1e6, norm_type=INF),
    ],
    ids=["value", "norm-1", "norm-2", "norm-inf", "global-1", "global-2", "global-inf"],
)
def test_threshold_above_the_norm_leaves_gradients_bit_for_bit(tmp_path, make_cb):
    cb = make_cb()
    before, after, metrics = fit(tmp_path, cb)
    for b, a in zip(before.steps, after.steps):
        for name in PARAM_NAMES:
            assert torch.equal(a[name], b[name]), name
    assert all(v == 0 for v in metrics["grad_clip/clip_rate"].values())
    assert metrics["grad_clip/norm_clipped"] == metrics["grad_clip/norm"]


class HandModel(pl.LightningModule):
    """Linear loss ``3 w0 + 4 w1 + 12 b``: the gradients are exactly ``w: [3, 4]``, ``b: [12]`` at every
    step, with exact norms (2-norm 13, 1-norm 19, inf-norm 12; per tensor 5 and 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w * torch.tensor([3.0, 4.0])).sum() + 12.0 * self.b.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "cb, w, b, norm, norm_clipped",
    [
        # at the threshold: untouched, bit for bit (no epsilon in the coefficient)
        (ClipByGlobalNorm(13.0), [3.0, 4.0], [12.0], 13.0, 13.0),
        (ClipByGlobalNorm(19.0, norm_type=1), [3.0, 4.0], [12.0], 19.0, 19.0),
        (ClipByGlobalNorm(12.0, norm_type=INF), [3.0, 4.0], [12.0], 12.0, 12.0),
        (ClipByNorm(12.0), [3.0, 4.0], [12.0], 13.0, 13.0),
        (ClipByValue(12.0), [3.0, 4.0], [12.0], 12.0, 12.0),
        # over it: halved exactly, or the hand-worked result
        (ClipByGlobalNorm(6.5), [1.5, 2.0], [6.0], 13.0, 6.5),
        (ClipByGlobalNorm(9.5, norm_type=1), [1.5, 2.0], [6.0], 19.0, 9.5),
        (ClipByGlobalNorm(6.0, norm_type=INF), [1.5, 2.0], [6.0], 12.0, 6.0),
        (ClipByNorm(5.0), [3.0, 4.0], [5.0], 13.0, math.sqrt(50.0)),
        (ClipByNorm(1.0), [0.6, 0.8], [1.0], 13.0, math.sqrt(2.0)),
        (ClipByNorm(2.0, norm_type=INF), [1.5, 2.0], [2.0], 12.0, 2.0),
        (ClipByValue(3.5), [3.0, 3.5], [3.5], 12.0, 3.5),
    ],
    ids=[
        "global-2-at", "global-1-at", "global-inf-at", "norm-2-at", "value-at",
        "global-2-over", "global-1-over", "global-inf-over",
        "norm-2-over", "norm-2-both", "norm-inf-over", "value-over",
    ],
)
def test_hand_worked_vectors(tmp_path, cb, w, b, norm, norm_clipped):
    cb = copy.deepcopy(cb)
    _, after, metrics = fit(tmp_path, cb, model=HandModel(), max_steps=2)
    for a in after.steps:
        torch.testing.assert_close(a["w"], torch.tensor(w), rtol=0, atol=0)
        torch.testing.assert_close(a["b"], torch.tensor(b), rtol=0, atol=0)
    for step in (0, 1):
        assert metrics["grad_clip/norm"][step] == norm
        assert_close_float32(metrics["grad_clip/norm_clipped"][step], norm_clipped)
        assert metrics["grad_clip/clip_rate"][step] == (norm_clipped < norm)


# ---------------------------------------------------------------------- which parameters
@pytest.mark.parametrize(
    "kind, include, exclude, selected",
    [
        ("value", ["encoder.*"], None, ["encoder.weight", "encoder.bias"]),
        ("norm-2", ["encoder.*"], None, ["encoder.weight", "encoder.bias"]),
        ("global-2", ["encoder.*"], None, ["encoder.weight", "encoder.bias"]),
        ("global-2", None, ["*.bias"], ["encoder.weight", "head.weight"]),
        ("global-inf", ["*.weight"], ["head.*"], ["encoder.weight"]),
        ("norm-2", None, ["head.weight", "encoder.?ias"], ["encoder.weight", "head.bias"]),
    ],
)
def test_include_exclude_select_what_is_clipped_and_counted(tmp_path, kind, include, exclude, selected):
    cb = FACTORIES[kind](include=include, exclude=exclude)
    before, after, metrics = fit(tmp_path, cb, max_steps=2)
    p = logged_norm_type(cb)
    distinguishes = False  # whether counting every gradient would have given another norm
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        ref = expected(cb, {n: b[n] for n in selected})
        for name in PARAM_NAMES:
            if name in selected:
                torch.testing.assert_close(a[name], ref[name])
            else:
                assert torch.equal(a[name], b[name]), f"{name} is not selected but was changed"
        # the logged norm counts the selected gradients only
        assert_close_float32(metrics["grad_clip/norm"][step], vec_norm([b[n] for n in selected], p))
        distinguishes |= not math.isclose(vec_norm([b[n] for n in selected], p), vec_norm(b.values(), p), rel_tol=1e-3)
    assert distinguishes
    assert any(not torch.equal(a[n], b[n]) for b, a in zip(before.steps, after.steps) for n in selected)


# ---------------------------------------------------------------------- optimizers and accumulation
@pytest.mark.parametrize("kind", BASIC + ["global-1"])
def test_two_optimizers_each_clipped_on_its_own_norm(tmp_path, kind):
    cb = FACTORIES[kind]()
    before, after, metrics = fit(tmp_path, cb, model=TwoOptimizerModel())
    # manual optimization: once per `opt.step()`, max_steps counts both optimizers' steps
    assert before.optimizers == after.optimizers == [0, 1, 0, 1]
    groups = {0: ["encoder.weight", "encoder.bias"], 1: ["head.weight", "head.bias"]}
    p = logged_norm_type(cb)
    for i, (b, a, opt) in enumerate(zip(before.steps, after.steps, before.optimizers)):
        assert list(b) == groups[opt]
        ref = expected(cb, b)  # the norm of this optimizer's gradients only
        for name in b:
            torch.testing.assert_close(a[name], ref[name])
        step = i // 2
        assert_close_float32(metrics[f"grad_clip/opt{opt}/norm"][step], vec_norm(b.values(), p))
        assert_close_float32(metrics[f"grad_clip/opt{opt}/norm_clipped"][step], vec_norm(a.values(), p))
    assert not any(k.startswith("grad_clip/") and "/opt" not in k for k in metrics), sorted(metrics)
    for name in ("norm", "norm_clipped", "threshold", "clip_rate", "nonfinite_steps"):
        assert set(metrics[f"grad_clip/opt0/{name}"]) == set(metrics[f"grad_clip/opt1/{name}"]) == {0, 1}
    assert metrics["grad_clip/opt0/norm"] != metrics["grad_clip/opt1/norm"]


def _accumulated_grads(model: nn.Module, batches) -> dict[str, Tensor]:
    """Lightning's accumulation by hand: the sum of each batch's loss / n, backpropagated."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (nn.functional.mse_loss(model(x), y) / len(batches)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class LBFGSModel(TinyModel):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


@pytest.mark.parametrize("kind", BASIC)
def test_a_closure_optimizer_is_clipped_at_every_evaluation(tmp_path, kind):
    # LBFGS evaluates its closure several times per step, and Lightning calls the hook after each one
    cb = FACTORIES[kind]()
    before, after, _ = fit(tmp_path, cb, model=LBFGSModel(), max_steps=2)
    assert len(before.steps) > 2  # more evaluations than optimizer steps
    for b, a in zip(before.steps, after.steps):
        ref = expected(cb, b)
        for name in PARAM_NAMES:
            torch.testing.assert_close(a[name], ref[name])


@pytest.mark.parametrize("kind", BASIC)
def test_accumulation_clips_once_per_optimizer_step_on_the_accumulated_gradient(tmp_path, kind):
    cb = FACTORIES[kind]()
    model = TinyModel(lr=0.01)
    reference = copy.deepcopy(model)
    loader = make_loader()
    before, after, metrics = fit(tmp_path, cb, model=model, loader=loader, max_steps=2, accumulate_grad_batches=2)
    assert len(before.steps) == len(after.steps) == 2  # four batches, two optimizer steps
    batches = list(loader)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    for k in range(2):
        accumulated = _accumulated_grads(reference, batches[2 * k : 2 * k + 2])
        for name in PARAM_NAMES:
            torch.testing.assert_close(before.steps[k][name], accumulated[name])
        ref = expected(cb, before.steps[k])
        for name in PARAM_NAMES:
            torch.testing.assert_close(after.steps[k][name], ref[name])
        # step the reference with the clipped gradients: the next accumulation starts from there
        for n, p in reference.named_parameters():
            p.grad = after.steps[k][n].clone()
        ref_opt.step()
        assert_close_float32(metrics["grad_clip/norm"][k], vec_norm(before.steps[k].values(), logged_norm_type(cb)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), dict(reference.named_parameters())[n].detach())


# ---------------------------------------------------------------------- argument checks
BAD_THRESHOLDS = [0, 0.0, -1, -1.0, NAN, INF, -INF, True, False, "a", "1.0", None, [1.0]]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS, ids=repr)
@pytest.mark.parametrize(
    "cls, arg", [(ClipByValue, "clip_value"), (ClipByNorm, "max_norm"), (ClipByGlobalNorm, "max_norm")]
)
def test_bad_threshold_is_rejected_naming_argument_and_value(cls, arg, bad):
    with pytest.raises(ValueError, match=re.escape(f"`{arg}` must be a positive finite number, got {bad!r}")):
        cls(bad)
    with pytest.raises(ValueError, match=re.escape(f"`{arg}`")):
        cls(**{arg: bad})


@pytest.mark.parametrize("bad", [0, 0.0, -1, -2.5, -INF, NAN, True, "a", "-inf", None], ids=repr)
@pytest.mark.parametrize("cls", [ClipByNorm, ClipByGlobalNorm])
def test_bad_norm_type_is_rejected_naming_argument_and_value(cls, bad):
    with pytest.raises(ValueError, match=re.escape(f"`norm_type` must be a positive number or 'inf', got {bad!r}")):
        cls(1.0, norm_type=bad)


@pytest.mark.parametrize("good, value", [("inf", INF), (INF, INF), (1, 1.0), (0.5, 0.5), (3, 3.0), ("2", 2.0)])
@pytest.mark.parametrize("cls", [ClipByNorm, ClipByGlobalNorm])
def test_norm_type_accepts_positive_numbers_and_inf(cls, good, value):
    cb = cls(2, norm_type=good)
    assert cb.norm_type == value and isinstance(cb.norm_type, float)
    assert cb.max_norm == 2.0 and isinstance(cb.max_norm, float)


def test_clip_value_is_stored_as_float():
    cb = ClipByValue(3)
    assert cb.clip_value == 3.0 and isinstance(cb.clip_value, float)


# ---------------------------------------------------------------------- the norm read on the host
@pytest.mark.parametrize("kind", ["ClipByValue", "ClipByNorm", "ClipByGlobalNorm"])
@pytest.mark.parametrize("nonfinite, threshold, scaled_steps", [
    ("skip", 1e6, 0),  # the norm read for the policy is under the threshold: no pass over the gradients
    ("skip", 1e-6, 4),
    ("ignore", 1e6, 4),  # nothing read: the device scales by exactly 1
])  # fmt: skip
def test_a_step_known_to_be_under_the_threshold_scales_nothing(tmp_path, monkeypatch, kind, nonfinite, threshold,
                                                               scaled_steps):
    from gradclip_plugin.callbacks import clip as module

    calls = []
    for name in ("scale_", "clip_by_value_"):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _op=op, **k: calls.append(1) or _op(*a, **k))
    cb = {"ClipByValue": ClipByValue, "ClipByNorm": ClipByNorm, "ClipByGlobalNorm": ClipByGlobalNorm}[kind](
        threshold, nonfinite=nonfinite
    )
    before, after, callbacks = probe_around(cb)
    trainer = make_trainer(tmp_path, callbacks, max_steps=4)
    trainer.fit(TinyModel(), make_loader())
    assert len(calls) == scaled_steps
    for b, a in zip(before.steps, after.steps):
        for n in b:
            if threshold > 1:
                assert torch.equal(a[n], b[n])
            else:
                assert not torch.equal(a[n], b[n])


# ---------------------------------------------------------------------- skip_above
class SpikeModel(TinyModel):
    """TinyModel whose loss is 1e4 times larger at global step 2: a spike too large to clip."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.global_step == 2 else loss


@pytest.mark.parametrize("make_cb", [lambda: ClipByGlobalNorm(5.0, skip_above=1e4), lambda: ClipByNorm(5.0, skip_above=1e4)],
                         ids=["global", "per-tensor"])
@pytest.mark.parametrize("optimizer", ["sgd", "fused-adam"])
def test_skip_above_skips_the_spike_and_clips_the_rest(tmp_path, make_cb, optimizer):
    class Model(SpikeModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, fused=True) if optimizer == "fused-adam" else super().configure_optimizers()

    cb = make_cb()
    weights = []

    class Weights(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    model = Model()
    before, after, metrics = fit(tmp_path, cb, model=model, max_steps=4, callbacks_after=[Weights()])
    norms = [vec_norm(b.values(), 2.0) for b in before.steps]
    assert norms[2] > 1e4 > max(norms[:2] + norms[3:])
    for step in (0, 1, 3):  # clipped by the rule
        ref = expected(cb, before.steps[step])
        for name in PARAM_NAMES:
            torch.testing.assert_close(after.steps[step][name], ref[name])
    for step in (1, 3):  # and stepped
        assert not all(torch.equal(a, b) for a, b in zip(weights[step - 1], weights[step]))
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # the spike's step: skipped
    assert metrics["grad_clip/skipped_steps"] == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    assert metrics["grad_clip/nonfinite_steps"][3] == 0.0
    if optimizer == "fused-adam":  # the skipped step did not count in Adam's state either
        assert {int(s["step"]) for s in model.trainer.optimizers[0].state.values()} == {3}


def test_skip_above_must_be_above_max_norm():
    with pytest.raises(ValueError, match=r"`skip_above` must be above `max_norm` \(5.0\).*got 5.0"):
        ClipByGlobalNorm(5.0, skip_above=5.0)
    with pytest.raises(ValueError, match=r"`skip_above` must be a positive finite number or None, got -1"):
        ClipByNorm(5.0, skip_above=-1)
    assert ClipByGlobalNorm(5.0, skip_above=50).skip_above == 50.0
