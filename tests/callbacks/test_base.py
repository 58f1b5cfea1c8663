"""What GradientClipCallback gives every clipping callback, checked in a real Trainer.

The non-finite policies, the metrics written through a CSVLogger (values, logging steps, clip rate,
keys), argument and setup checks, and the checkpoint state. Reference values come from the probed
gradients, with the formulas in ``test_clip``.
"""

from __future__ import annotations

import copy
import math
import fnmatch
import re
import warnings

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gradclip_plugin import ClipByGlobalNorm, ClipByNorm, ClipByValue, GradientClipCallback
from gradclip_plugin.callbacks import ClipStats
import pytorch_lightning as pl
from helpers import GradProbe, TinyModel, TwoOptimizerModel, make_loader, make_trainer, nonfinite_steps

from .test_clip import PARAM_NAMES, assert_close_float32, expected, fit, read_metrics, vec_norm

INF = float("inf")
NAN = float("nan")
METRIC_NAMES = ("norm", "norm_max", "norm_clipped", "threshold", "clip_rate", "nonfinite_steps")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------- models
class LoggingModel(TinyModel):
    """TinyModel that `self.log`s its training loss, to see at which steps Lightning logs."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss


def poison(model: TinyModel, loss: Tensor, mode: str) -> Tensor:
    """Make some gradients non-finite:

    * ``"loss-inf"``: the loss times inf (every gradient entry inf or NaN);
    * ``"entry-inf"``: plus ``inf * encoder.weight[0, 0]`` (that one entry's gradient is inf);
    * ``"bias-nan"``: plus ``nan * sum(head.bias)`` (head.bias's gradient is NaN, the rest finite).
    """
    if mode == "loss-inf":
        return loss * INF
    if mode == "entry-inf":
        return loss + model.encoder.weight[0, 0] * INF
    assert mode == "bias-nan"
    return loss + model.head.bias.sum() * NAN


class NonFiniteModel(TinyModel):
    """TinyModel whose gradients are made non-finite (see ``poison``) at the given global steps."""

    def __init__(self, mode: str, bad_steps=(1,), **kwargs):
        super().__init__(**kwargs)
        self.mode, self.bad_steps = mode, tuple(bad_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return poison(self, loss, self.mode) if self.global_step in self.bad_steps else loss


class NonFiniteHeadTwoOptimizerModel(TwoOptimizerModel):
    """Two optimizers; at the first batch the head's (second optimizer's) bias gradient is NaN."""

    def training_step(self, batch, batch_idx):
        opt_enc, opt_head = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if batch_idx == 0:
            loss = poison(self, loss, "bias-nan")
        opt_enc.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_enc.step()
        opt_head.step()


class StateProbe(Callback):
    """Snapshots of the weights and the optimizer state at the start and end of every batch."""

    def __init__(self) -> None:
        self.start: list = []
        self.end: list = []

    @staticmethod
    def _snapshot(trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        return params, copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append(self._snapshot(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(self._snapshot(trainer, pl_module))


def assert_same_snapshot(a, b) -> None:
    params_a, state_a = a
    params_b, state_b = b
    for name in PARAM_NAMES:
        assert torch.equal(params_a[name], params_b[name]), name
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for k in state_a[i]:
            assert torch.equal(state_a[i][k], state_b[i][k]), (i, k)


def nonfinite_warnings(record) -> list:
    return [w for w in record if "non-finite gradients found" in str(w.message)]


# ---------------------------------------------------------------------- non-finite policies
def test_skip_leaves_weights_and_adam_state_bit_for_bit_and_training_goes_on(tmp_path):
    cb = ClipByGlobalNorm(5.0)  # nonfinite="skip" is the default
    states = StateProbe()
    model = NonFiniteModel("loss-inf", bad_steps=(1, 2), optimizer="adam", lr=0.01)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [states, cb], logger=logger, max_steps=4)
    with pytest.warns(UserWarning, match="non-finite gradients found") as record:
        trainer.fit(model, make_loader())
    assert len(nonfinite_warnings(record)) == 1, "the warning is shown once"
    assert "skipping the optimizer step" in str(nonfinite_warnings(record)[0].message)
    assert trainer.global_step == 4 and len(states.end) == 4
    for k in (1, 2):  # the poisoned steps change nothing
        assert_same_snapshot(states.start[k], states.end[k])
    for k in (0, 3):  # the others train
        assert not torch.equal(states.start[k][0]["encoder.weight"], states.end[k][0]["encoder.weight"])
    adam_steps = [int(s["step"]) for s in states.end[3][1].values()]
    assert adam_steps == [2, 2, 2, 2], "Adam stepped at steps 0 and 3 only"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = read_metrics(logger)
    assert metrics["grad_clip/nonfinite_steps"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.0}
    assert nonfinite_steps(cb) == {0: 2.0}


def test_skip_with_two_optimizers_skips_only_the_one_with_nonfinite_gradients(tmp_path):
    cb = ClipByGlobalNorm(5.0)
    states = StateProbe()
    model = NonFiniteHeadTwoOptimizerModel()
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [states, cb], logger=logger, max_steps=2)
    with pytest.warns(UserWarning, match="non-finite gradients found"):
        trainer.fit(model, make_loader())
    (start, _), (end, _) = states.start[0], states.end[0]
    assert torch.equal(start["head.weight"], end["head.weight"]) and torch.equal(start["head.bias"], end["head.bias"])
    assert not torch.equal(start["encoder.weight"], end["encoder.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = read_metrics(logger)
    assert metrics["grad_clip/opt0/nonfinite_steps"] == {0: 0.0}
    assert metrics["grad_clip/opt1/nonfinite_steps"] == {0: 1.0}


class FusedNonFiniteModel(NonFiniteModel):
    def __init__(self, optimizer: str = "adam", bad_steps=(1,), **kwargs):
        super().__init__("loss-inf", bad_steps=bad_steps, **kwargs)
        self.kind = optimizer

    def configure_optimizers(self):
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.kind]
        return cls(self.parameters(), lr=0.01, fused=True, **({"momentum": 0.9} if self.kind == "sgd" else {}))


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("accelerator", ["cpu", CUDA])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_fused_optimizer_skips_on_the_device_exactly_and_the_step_is_counted_and_warned(tmp_path, optimizer, accelerator):
    # fused Adam, AdamW and SGD take `found_inf` (what GradScaler uses): the step is skipped with nothing read
    # back (tests/test_no_sync.py counts the reads), weights and every state tensor bit-for-bit unchanged
    # (on CUDA too: its fused kernels are not CPU's)
    cb, states = ClipByGlobalNorm(5.0), StateProbe()
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [states, cb], logger=logger, max_steps=4, log_every_n_steps=2, accelerator=accelerator)
    with pytest.warns(UserWarning, match="non-finite gradients found, skipping the optimizer step") as record:
        trainer.fit(FusedNonFiniteModel(optimizer), make_loader())
    assert len(nonfinite_warnings(record)) == 1
    assert_same_snapshot(states.start[1], states.end[1])
    for k in (0, 2, 3):
        assert not torch.equal(states.start[k][0]["encoder.weight"], states.end[k][0]["encoder.weight"])
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert read_metrics(logger)["grad_clip/nonfinite_steps"] == {1: 1.0, 3: 1.0}
    assert not hasattr(trainer.optimizers[0], "found_inf")  # the flag was for that step only
    if optimizer != "sgd":
        assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}


def test_a_fused_sgd_with_momentum_skipping_its_first_step_keeps_an_empty_state(tmp_path):
    # torch's fused SGD makes its momentum buffers with `empty_like` at its first step, and a step skipped by
    # `found_inf` never writes them: that step is decided on the host, its state stays empty, and the run
    # equals the non-fused SGD's
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        cb, states = ClipByGlobalNorm(5.0), StateProbe()
        model = FusedNonFiniteModel("sgd", bad_steps=(0,))
        if not fused:
            model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        with pytest.warns(UserWarning, match="skipping the optimizer step"):
            make_trainer(tmp_path / str(fused), [states, cb], max_steps=4).fit(model, make_loader())
        runs[fused] = states
    fused, plain = runs[True], runs[False]
    assert_same_snapshot(fused.start[0], fused.end[0])
    assert fused.end[0][1] == {}  # no momentum buffer
    for k in range(4):
        for name, w in fused.end[k][0].items():
            torch.testing.assert_close(w, plain.end[k][0][name])


def test_two_callbacks_on_one_fused_optimizer_skip_if_either_asks(tmp_path):
    # the first callback asks to skip the spike's step (`skip_above`), the second (a value clip that leaves a
    # finite norm) would not: both decisions are on the device, and the step is skipped
    from .test_clip import SpikeModel

    class Model(SpikeModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)

    first, second, states = ClipByGlobalNorm(5.0, skip_above=1e4), ClipByValue(1.0), StateProbe()
    trainer = make_trainer(tmp_path, [states, first, second], max_steps=4)
    trainer.fit(Model(), make_loader())
    assert_same_snapshot(states.start[2], states.end[2])
    assert not torch.equal(states.start[3][0]["encoder.weight"], states.end[3][0]["encoder.weight"])
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}
    assert not hasattr(trainer.optimizers[0], "found_inf")


class SharedParameterModel(pl.LightningModule):
    """Manual optimization, `SGD([a, shared])` then `SGD([shared, b])`; `a`'s gradient is NaN, the others 1."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.shared, self.b = (nn.Parameter(torch.tensor(1.0)) for _ in range(3))

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(self.a * NAN + self.shared + self.b)
        first.step()
        second.step()

    def configure_optimizers(self):
        return [torch.optim.SGD([self.a, self.shared], lr=0.2), torch.optim.SGD([self.shared, self.b], lr=0.2)]


def test_a_skipped_step_leaves_a_shared_parameter_its_gradient_for_the_other_optimizer(tmp_path):
    # The first optimizer skips (NaN in `a`); the second, all finite, steps `shared` and `b` by lr * 1.
    model = SharedParameterModel()
    with pytest.warns(UserWarning, match="skipping the optimizer step"):
        make_trainer(tmp_path, [ClipByGlobalNorm(1e9)], max_steps=2).fit(model, make_loader(n=4))
    assert model.a.item() == 1.0  # the skipped optimizer's own parameter is untouched
    assert model.shared.item() == pytest.approx(0.8) and model.b.item() == pytest.approx(0.8)


class TwoStepsPerBatchModel(TinyModel):
    """Manual optimization, one optimizer stepped twice per batch: first on a large loss, then on a small one."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.automatic_optimization = False
        self.norms: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for scale in (100.0, 0.01):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self(x), y) * scale)
            self.norms.append(vec_norm([p.grad for p in self.parameters()], 2.0))
            opt.step()


def test_two_steps_of_one_optimizer_in_a_batch_are_both_in_the_metrics(tmp_path):
    model = TwoStepsPerBatchModel()
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [ClipByGlobalNorm(5.0)], logger=logger, max_steps=6).fit(model, make_loader())
    assert all(big > 5.0 > small for big, small in zip(model.norms[::2], model.norms[1::2]))
    metrics = read_metrics(logger)
    assert metrics["grad_clip/clip_rate"] == {0: 0.5, 1: 0.5, 2: 0.5}  # one clipped step of the two, each batch
    for batch, small in enumerate(model.norms[1::2]):  # the norm of the last step of the batch
        assert_close_float32(metrics["grad_clip/norm"][batch], small)


class Wrapped(pl.LightningModule):
    """A TinyModel inside another module: its parameters are now named `model.encoder.*`, `model.head.*`."""

    def __init__(self, model: TinyModel) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.model.configure_optimizers()


def test_a_callback_reused_for_another_fit_selects_anew(tmp_path):
    cb = ClipByGlobalNorm(1.0, exclude=["*head.*"])
    net = TinyModel()
    before, after = GradProbe(), GradProbe()
    make_trainer(tmp_path, [before, cb, after], max_steps=1).fit(net, make_loader())
    assert torch.equal(before.steps[0]["head.weight"], after.steps[0]["head.weight"])  # excluded
    before, after = GradProbe(), GradProbe()
    make_trainer(tmp_path, [before, cb, after], max_steps=1).fit(Wrapped(net), make_loader())
    b, a = before.steps[0], after.steps[0]  # `model.head.*` is excluded too, by the new names
    clipped = {n: g for n, g in b.items() if "head." not in n}
    coef = 1.0 / vec_norm(clipped.values(), 2.0)
    assert coef < 1
    for name in b:
        torch.testing.assert_close(a[name], b[name] * coef if name in clipped else b[name])
    # a pattern that matches nothing in this fit's module is refused at fit start, as `include` is
    with pytest.raises(MisconfigurationException, match=r"the `exclude` pattern 'head\.\*' matches no parameter"):
        make_trainer(tmp_path, [ClipByGlobalNorm(1.0, exclude=["head.*"])], max_steps=1).fit(Wrapped(net), make_loader())


@pytest.mark.parametrize(
    "mode, names",
    [
        ("bias-nan", ["head.bias"]),
        ("entry-inf", ["encoder.weight"]),
        ("loss-inf", ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]),
    ],
)
def test_error_raises_naming_the_parameters_with_nonfinite_gradients(tmp_path, mode, names):
    cb = ClipByNorm(5.0, nonfinite="error")
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    message = f"ClipByNorm: non-finite gradients at global step 1 in {names}"
    with pytest.raises(RuntimeError, match=re.escape(message)) as excinfo:
        trainer.fit(NonFiniteModel(mode, bad_steps=(1,)), make_loader())
    assert "nonfinite='skip'" in str(excinfo.value)


def test_a_failing_step_still_logs_what_it_measured(tmp_path):
    # Metrics reach the loggers at the end of the batch; a batch that raises (here nonfinite="error")
    # still writes what it measured: the monitor's per-group norms show where the NaN is.
    from pytorch_lightning.loggers import Logger

    from gradclip_plugin import GradientNormMonitor

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    logger = Recorder()
    trainer = make_trainer(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(5.0, nonfinite="error")], max_steps=3,
                           logger=logger, log_every_n_steps=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="non-finite gradients at global step 1"):
        trainer.fit(NonFiniteModel("bias-nan", bad_steps=(1,)), make_loader())
    steps: dict[int, dict] = {}
    for step, metrics in logger.calls:
        steps.setdefault(step, {}).update(metrics)
    assert sorted(steps) == [0, 1]
    assert steps[1]["grad_norm/nonfinite_steps"] == 1.0  # the monitor's count, written before the error
    assert "grad_norm/total" not in steps[1] and steps[1]["grad_norm/encoder"] > 0  # NaN is not drawn
    assert "grad_clip/norm" not in steps[1]  # the clipper raised: no norm of its own...
    assert steps[1]["grad_clip/nonfinite_steps"] == 1.0  # ...but the step is counted


def test_excluded_nonfinite_gradients_are_not_checked(tmp_path):
    cb = ClipByGlobalNorm(5.0, nonfinite="error", exclude=["head.bias"])
    before, after, metrics = fit(tmp_path, cb, model=NonFiniteModel("bias-nan", bad_steps=(1,)), max_steps=2)
    assert torch.isnan(after.steps[1]["head.bias"]).all()
    assert metrics["grad_clip/nonfinite_steps"] == {0: 0.0, 1: 0.0}
    ref = expected(cb, {n: before.steps[1][n] for n in PARAM_NAMES[:3]})
    for name in PARAM_NAMES[:3]:
        torch.testing.assert_close(after.steps[1][name], ref[name])


@pytest.mark.parametrize(
    "make_cb",
    [lambda: ClipByValue(1.0, nonfinite="zero"), lambda: ClipByNorm(5.0, nonfinite="zero"),
     lambda: ClipByGlobalNorm(5.0, nonfinite="zero")],
    ids=["value", "norm", "global"],
)
def test_zero_replaces_nonfinite_entries_with_zero_then_clips(tmp_path, make_cb):
    cb = make_cb()
    with pytest.warns(UserWarning, match="zeroing the non-finite entries") as record:
        before, after, metrics = fit(tmp_path, cb, model=NonFiniteModel("entry-inf", bad_steps=(1,)), max_steps=3)
    assert len(nonfinite_warnings(record)) == 1
    b, a = before.steps[1], after.steps[1]
    assert torch.isposinf(b["encoder.weight"][0, 0]) and torch.isfinite(b["encoder.weight"].flatten()[1:]).all()
    zeroed = {n: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for n, g in b.items()}
    ref = expected(cb, zeroed)
    for name in PARAM_NAMES:
        torch.testing.assert_close(a[name], ref[name])
    assert a["encoder.weight"][0, 0] == 0
    p = INF if isinstance(cb, ClipByValue) else 2.0
    assert_close_float32(metrics["grad_clip/norm"][1], vec_norm(zeroed.values(), p))
    assert metrics["grad_clip/nonfinite_steps"] == {0: 0.0, 1: 1.0, 2: 1.0}


@pytest.mark.parametrize(
    "make_cb, torch_clip",
    [
        (lambda: ClipByGlobalNorm(5.0, nonfinite="ignore"), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 5.0)),
        (lambda: ClipByValue(1.0, nonfinite="ignore"), lambda ps: torch.nn.utils.clip_grad_value_(ps, 1.0)),
    ],
    ids=["global", "value"],
)
@pytest.mark.parametrize("mode", ["bias-nan", "entry-inf"])
def test_ignore_does_what_torch_does(tmp_path, make_cb, torch_clip, mode):
    cb = make_cb()
    model = NonFiniteModel(mode, bad_steps=(1,))
    with warnings.catch_warnings(record=True) as record:  # nothing is skipped, so no word of a skip
        warnings.simplefilter("always")
        before, after, _ = fit(tmp_path, cb, model=model, max_steps=2)
    assert not [w for w in record if "skipping" in str(w.message)]
    b, a = before.steps[1], after.steps[1]
    # torch's own clipping on the same gradients
    ps = [nn.Parameter(torch.zeros_like(b[n])) for n in PARAM_NAMES]
    for p, n in zip(ps, PARAM_NAMES):
        p.grad = b[n].clone()
    torch_clip(ps)
    for p, n in zip(ps, PARAM_NAMES):
        torch.testing.assert_close(a[n], p.grad, equal_nan=True)
    if mode == "bias-nan":  # the NaN reaches the weights, as without the callback
        assert torch.isnan(model.head.bias).all()


# ---------------------------------------------------------------------- metrics
def scaled_loader(scales, batch_size: int = 4, in_features: int = 8) -> DataLoader:
    """One batch per entry of ``scales``; the targets of batch k are scaled by ``scales[k]``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(scales) * batch_size, in_features, generator=g)
    y = torch.randn(len(scales) * batch_size, 1, generator=g)
    y = y * torch.tensor(scales).repeat_interleave(batch_size)[:, None]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_metrics_follow_log_every_n_steps_with_the_clip_rate_of_each_window(tmp_path):
    # lr=0: the weights never move, so each step's gradient depends on its batch alone, and the
    # targets' scale decides which steps exceed the threshold: windows of two steps clip 1/2, 2/2, 0/2.
    scales = [1.0, 100.0, 100.0, 100.0, 1.0, 1.0, 1.0, 1.0]
    expected_rate = {1: 0.5, 3: 1.0, 5: 0.0}
    model = LoggingModel(lr=0.0)
    loader = scaled_loader(scales)
    reference = copy.deepcopy(model)
    norms = []
    for x, y in loader:
        reference.zero_grad(set_to_none=True)
        nn.functional.mse_loss(reference(x), y).backward()
        norms.append(vec_norm([p.grad for p in reference.parameters()], 2.0))
    small = max(n for n, s in zip(norms, scales) if s == 1.0)
    big = min(n for n, s in zip(norms, scales) if s == 100.0)
    assert 10 * small < big
    threshold = (small * big) ** 0.5

    cb = ClipByGlobalNorm(threshold)
    before, after, metrics = fit(tmp_path, cb, model=model, loader=loader, max_steps=6, log_every_n_steps=2)
    assert len(before.steps) == 6
    # logged exactly where Lightning logs the module's own metrics
    loss_steps = set(metrics["train_loss"])
    assert loss_steps == {1, 3, 5}
    for name in METRIC_NAMES:
        assert set(metrics[f"grad_clip/{name}"]) == loss_steps, name
    for step in loss_steps:
        b, a = before.steps[step], after.steps[step]
        assert_close_float32(metrics["grad_clip/norm"][step], vec_norm(b.values(), 2.0))
        assert_close_float32(metrics["grad_clip/norm_clipped"][step], vec_norm(a.values(), 2.0))
        assert metrics["grad_clip/threshold"][step] == threshold
        assert metrics["grad_clip/nonfinite_steps"][step] == 0
    # the rate: fraction of the window's steps at which clipping changed the gradients
    changed = [any(not torch.equal(a[n], b[n]) for n in PARAM_NAMES) for b, a in zip(before.steps, after.steps)]
    assert {s: (changed[s - 1] + changed[s]) / 2 for s in loss_steps} == expected_rate
    assert metrics["grad_clip/clip_rate"] == expected_rate


@pytest.mark.parametrize(
    "make_cbs, keys",
    [
        (lambda: [ClipByValue(5.0), ClipByGlobalNorm(5.0)], ["grad_clip/ClipByValue", "grad_clip/ClipByGlobalNorm"]),
        (
            lambda: [ClipByNorm(5.0, include=["encoder.*"]), ClipByNorm(5.0, include=["head.*"])],
            ["grad_clip/ClipByNorm0", "grad_clip/ClipByNorm1"],
        ),
        (lambda: [ClipByNorm(5.0, log_prefix="a"), ClipByNorm(5.0, log_prefix="b")], ["a", "b"]),
    ],
    ids=["two-types", "same-type", "two-prefixes"],
)
def test_two_clipping_callbacks_log_distinct_keys(tmp_path, make_cbs, keys):
    first, second = make_cbs()
    probes = [GradProbe(), GradProbe(), GradProbe()]
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [probes[0], first, probes[1], second, probes[2]], logger=logger, max_steps=2)
    trainer.fit(TinyModel(), make_loader())
    metrics = read_metrics(logger)
    logged = {k for k in metrics if k not in ("epoch",)}
    assert logged == {f"{key}/{name}" for key in keys for name in METRIC_NAMES}
    # each callback logs its own numbers: the second one sees what the first one left
    for cb, key, probe in zip((first, second), keys, probes):
        for step, grads in enumerate(probe.steps):
            selected = [
                g for n, g in grads.items() if not cb.include or any(fnmatch.fnmatchcase(n, pat) for pat in cb.include)
            ]
            p = INF if isinstance(cb, ClipByValue) else cb.norm_type
            assert_close_float32(metrics[f"{key}/norm"][step], vec_norm(selected, p))


def test_two_callbacks_and_two_optimizers_log_distinct_keys(tmp_path):
    logger = CSVLogger(tmp_path)
    cbs = [ClipByValue(5.0), ClipByGlobalNorm(5.0)]
    trainer = make_trainer(tmp_path, cbs, logger=logger, max_steps=2)
    trainer.fit(TwoOptimizerModel(), make_loader())
    keys = {k for k in read_metrics(logger) if k != "epoch"}
    assert keys == {
        f"grad_clip/{cls}/opt{i}/{name}"
        for cls in ("ClipByValue", "ClipByGlobalNorm")
        for i in (0, 1)
        for name in METRIC_NAMES
    }


class HalvingClip(GradientClipCallback):
    """A minimal subclass: halves every selected gradient and reports made-up stats."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.measure_calls = 0
        self.clip_calls: list[bool] = []

    def measure(self, grads):
        self.measure_calls += 1
        return torch.stack([torch.linalg.vector_norm(g) for g in grads]), "aux"

    def clip_(self, grads, params, step):
        assert step.extra == "aux" and step.norms.shape == (len(grads),)
        self.clip_calls.append(all(g is p.grad for g, p in zip(grads, params)))
        for g in grads:
            g.mul_(0.5)
        return ClipStats(step.norm, step.norm * 0.5, torch.tensor(7.0), torch.tensor(True), {"extra": torch.tensor(3.0)})


def test_base_class_measures_once_clips_in_place_and_logs_the_returned_stats(tmp_path):
    cb = HalvingClip(exclude=["head.bias"])
    before, after, metrics = fit(tmp_path, cb, max_steps=3)
    assert cb.measure_calls == 3, "measured once per optimizer step, no second pass"
    assert cb.clip_calls == [True, True, True], "clip_ gets the parameters' own .grad tensors"
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        for name in PARAM_NAMES[:3]:
            assert torch.equal(a[name], b[name] * 0.5)
        assert torch.equal(a["head.bias"], b["head.bias"])
        assert_close_float32(metrics["grad_clip/norm"][step], vec_norm([b[n] for n in PARAM_NAMES[:3]], 2.0))
        assert metrics["grad_clip/norm_clipped"][step] == metrics["grad_clip/norm"][step] * 0.5
        assert metrics["grad_clip/threshold"][step] == 7.0
        assert metrics["grad_clip/extra"][step] == 3.0
        assert metrics["grad_clip/clip_rate"][step] == 1.0


def test_base_class_alone_has_no_rule():
    with pytest.raises(NotImplementedError, match="base class"):
        GradientClipCallback().clip_([torch.ones(2)], [torch.ones(2)], None)


# ---------------------------------------------------------------------- argument and setup checks
@pytest.mark.parametrize("bad", ["drop", "Skip", "", None, 0], ids=repr)
def test_unknown_nonfinite_policy_is_rejected(bad):
    message = f"`nonfinite` must be one of ['skip', 'error', 'zero', 'ignore'], got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipByGlobalNorm(1.0, nonfinite=bad)


@pytest.mark.parametrize("policy", ["skip", "error", "zero", "ignore"])
def test_known_nonfinite_policies_are_accepted(policy):
    assert ClipByValue(1.0, nonfinite=policy).nonfinite == policy


@pytest.mark.parametrize("bad", ["encoder.*", ["encoder.*", 1], [None], 5, b"encoder.*"], ids=repr)
@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_patterns_must_be_a_list_of_strings(arg, bad):
    message = f"`{arg}` must be a list of fnmatch patterns such as ['encoder.*'], got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipByNorm(1.0, **{arg: bad})


@pytest.mark.parametrize("bad", ["", None, 3], ids=repr)
def test_log_prefix_must_be_a_nonempty_string(bad):
    with pytest.raises(ValueError, match=re.escape(f"`log_prefix` must be a non-empty string, got {bad!r}")):
        ClipByValue(1.0, log_prefix=bad)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_setup_refuses_trainer_gradient_clip_val(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    message = "ClipByGlobalNorm clips the gradients itself, but `Trainer(gradient_clip_val=0.5)` is also set"
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        trainer.fit(TinyModel(), make_loader())


@pytest.mark.parametrize("include, bad", [(["decoder.*"], "decoder.*"), (["encoder.*", "haed.*"], "haed.*")])
def test_setup_refuses_an_include_pattern_that_matches_nothing(tmp_path, include, bad):
    trainer = make_trainer(tmp_path, [ClipByNorm(1.0, include=include)])
    message = f"ClipByNorm: the `include` pattern {bad!r} matches no parameter of TinyModel"
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        trainer.fit(TinyModel(), make_loader())


# ---------------------------------------------------------------------- checkpoint state
def test_state_dict_round_trip_of_nonfinite_steps(tmp_path):
    cb = ClipByGlobalNorm(5.0)
    trainer = make_trainer(tmp_path, [cb], max_steps=4)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(NonFiniteModel("loss-inf", bad_steps=(1, 2)), make_loader())
    state = cb.state_dict()
    plain = lambda st: {i: {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in t.items()}  # noqa: E731
                        for i, t in st["tallies"].items()}  # fmt: skip
    assert state["tallies"][0]["norm_max"] > 5.0  # no logger read it: the largest norm of the two steps that clipped
    assert {k: v for k, v in plain(state)[0].items() if k != "norm_max"} == {
        "steps": 4, "finite": 2, "ran": 2, "clipped": 2, "skipped": 0, "streak": 0, "since": 1, "at_log": (0, 0, 0)}
    fresh = ClipByGlobalNorm(5.0)
    fresh.load_state_dict(copy.deepcopy(state))
    assert plain(fresh.state_dict()) == plain(state)

    # through a checkpoint: the resumed callback goes on counting from 2
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    resumed = ClipByGlobalNorm(5.0)
    logger = CSVLogger(tmp_path, version="resumed")
    trainer = make_trainer(tmp_path, [resumed], logger=logger, max_steps=6)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(NonFiniteModel("loss-inf", bad_steps=(4,)), make_loader(), ckpt_path=path)
    assert read_metrics(logger)["grad_clip/nonfinite_steps"] == {4: 3.0, 5: 3.0}
    assert nonfinite_steps(resumed) == {0: 3.0}


def test_two_callbacks_of_one_type_keep_their_own_state_in_a_checkpoint(tmp_path):
    enc, head = ClipByNorm(5.0, include=["encoder.*"]), ClipByNorm(5.0, include=["head.*"])
    trainer = make_trainer(tmp_path, [enc, head], max_steps=2)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(NonFiniteModel("bias-nan", bad_steps=(1,)), make_loader())  # only head.bias
    assert nonfinite_steps(enc) == {0: 0.0}
    assert nonfinite_steps(head) == {0: 1.0}
    assert enc.state_key != head.state_key, "two instances in one Trainer need distinct checkpoint keys"
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    enc2, head2 = ClipByNorm(5.0, include=["encoder.*"]), ClipByNorm(5.0, include=["head.*"])
    trainer = make_trainer(tmp_path, [enc2, head2], max_steps=3)
    trainer.fit(NonFiniteModel("bias-nan", bad_steps=()), make_loader(), ckpt_path=path)
    assert nonfinite_steps(enc2) == {0: 0.0}
    assert nonfinite_steps(head2) == {0: 1.0}


def test_state_key_is_the_class_and_log_prefix(tmp_path):
    # What identifies the state, as EarlyStopping's `monitor` and `mode`: not the thresholds (changed on a
    # resume, they must not orphan the statistics), nor the module, nor the other callbacks.
    cb = ClipByGlobalNorm(5.0, include=["encoder.*"])
    make_trainer(tmp_path, [cb, ClipByValue(1e9)], max_steps=1).fit(TinyModel(), make_loader())
    assert cb.state_key == "ClipByGlobalNorm{'log_prefix': 'grad_clip'}"
    other = ClipByGlobalNorm(0.5, norm_type=1.0, include=["head.*"])
    make_trainer(tmp_path, [other], max_steps=1).fit(TinyModel(), make_loader())
    assert other.state_key == cb.state_key
    assert ClipByNorm(5.0).state_key != ClipByGlobalNorm(5.0).state_key  # before setup too: unique to each
    prefixed = ClipByGlobalNorm(5.0, log_prefix="clip_a")
    make_trainer(tmp_path, [prefixed], max_steps=1).fit(TinyModel(), make_loader())
    assert prefixed.state_key == "ClipByGlobalNorm{'log_prefix': 'clip_a'}"


def test_callbacks_of_one_class_sharing_a_prefix_get_a_position(tmp_path):
    first, second = ClipByNorm(5.0, include=["encoder.*"]), ClipByNorm(1.0, include=["head.*"])
    make_trainer(tmp_path, [first, second], max_steps=1).fit(TinyModel(), make_loader())
    assert first.state_key == "ClipByNorm{'log_prefix': 'grad_clip', 'position': 0}"
    assert second.state_key == "ClipByNorm{'log_prefix': 'grad_clip', 'position': 1}"


def test_checkpoint_restores_into_another_module_class(tmp_path):
    cb = ClipByGlobalNorm(5.0)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(NonFiniteModel("loss-inf", bad_steps=(1,)), make_loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    resumed = ClipByGlobalNorm(5.0)
    make_trainer(tmp_path, [resumed], max_steps=3).fit(TinyModel(), make_loader(), ckpt_path=path)
    assert nonfinite_steps(resumed) == {0: 1.0}


class LateSpikeModel(TinyModel):
    """Gradients far under max_norm=1 for the first two steps, far above it from step 2 on."""

    def training_step(self, batch, batch_idx):
        scale = 1e-3 if self.global_step < 2 else 1e3
        return super().training_step(batch, batch_idx) * scale


def test_clip_rate_interval_survives_a_resume_in_the_middle_of_it(tmp_path):
    # log_every_n_steps=4: the first rate is logged at the 4th step and covers steps 0-3,
    # two unclipped (before the checkpoint) and two clipped (after it): 0.5, not 1.0.
    first = make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], max_steps=2, log_every_n_steps=4)
    first.fit(LateSpikeModel(), make_loader())
    path = tmp_path / "mid.ckpt"
    first.save_checkpoint(path)
    logger = CSVLogger(tmp_path, version="resumed")
    resumed = make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], max_steps=4, log_every_n_steps=4, logger=logger)
    with pytest.warns(UserWarning):  # Lightning: the dataloader is not resumable mid-epoch
        resumed.fit(LateSpikeModel(), make_loader(), ckpt_path=path)
    assert read_metrics(logger)["grad_clip/clip_rate"] == {3: 0.5}


# --- issue 17: what the metrics say, and the defects found by attacking the package ------------------


def test_a_step_skipped_by_skip_above_is_not_a_clipped_one(tmp_path):
    # every step's norm is above `skip_above`: all are skipped, none ran, so none was clipped
    logger = CSVLogger(tmp_path)
    probe = StateProbe()
    cb = ClipByGlobalNorm(0.5, skip_above=1.0, max_consecutive_skips=None)
    make_trainer(tmp_path, [probe, cb], logger=logger, max_steps=4).fit(TinyModel(), make_loader())
    metrics = read_metrics(logger)
    assert metrics["grad_clip/skipped_steps"] == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert "grad_clip/clip_rate" not in metrics  # no step ran: there is no rate to claim
    assert "grad_clip/norm_clipped" not in metrics and "grad_clip/threshold" not in metrics
    assert all(v > 1.0 for v in metrics["grad_clip/norm"].values())  # the pre-clip norm is still told
    for (start, _), (end, _) in zip(probe.start, probe.end):  # the weights never changed
        assert all(torch.equal(start[n], end[n]) for n in start)


def test_norm_max_is_the_largest_norm_of_every_step_between_logs(tmp_path):
    logger = CSVLogger(tmp_path)
    probe = GradProbe()
    make_trainer(tmp_path, [probe, ClipByGlobalNorm(1e9)], logger=logger, max_steps=6, log_every_n_steps=3).fit(
        TinyModel(), make_loader()
    )
    norms = [vec_norm([g for g in step.values() if g is not None], 2.0) for step in probe.steps]
    logged = read_metrics(logger)["grad_clip/norm_max"]
    assert logged == pytest.approx({2: max(norms[:3]), 5: max(norms[3:6])}, rel=1e-5)


def test_one_write_per_logged_step_under_gradient_accumulation(tmp_path):
    # `read_metrics` fails on a key written twice at one step; the window covers every step since the last log
    logger = CSVLogger(tmp_path)
    cb = ClipByGlobalNorm(1.0)
    trainer = make_trainer(tmp_path, [cb], logger=logger, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=4)
    trainer.fit(TinyModel(), make_loader(n=64))
    metrics = read_metrics(logger)
    assert metrics["grad_clip/clip_rate"] == {1: 1.0, 3: 1.0}
    assert set(metrics["grad_clip/norm"]) == {1, 3}


def test_a_compiled_submodule_is_named_without_orig_mod(tmp_path):
    from collections import OrderedDict

    class Compiled(TinyModel):  # names `body._orig_mod.encoder.weight`, ... in named_parameters()
        def __init__(self):
            super().__init__()
            self.body = torch.compile(nn.Sequential(OrderedDict(encoder=self.encoder, act=nn.Tanh(), head=self.head)), backend="eager")
            del self.encoder, self.head

        def forward(self, x):
            return self.body(x)

    before, after = GradProbe(), GradProbe()
    logger = CSVLogger(tmp_path)
    cb = ClipByGlobalNorm(1.0, exclude=["body.head.*"], group_depth=2)
    make_trainer(tmp_path, [before, cb, after], logger=logger, max_steps=1).fit(Compiled(), make_loader())
    heads = [n for n in before.steps[0] if ".head." in n]
    assert heads and all(torch.equal(before.steps[0][n], after.steps[0][n]) for n in heads)  # excluded
    assert {k for k in read_metrics(logger) if k.startswith("grad_clip/norm/")} == {"grad_clip/norm/body.encoder"}


@pytest.mark.parametrize("cls, args", [(ClipByValue, (1.0,)), (pytest.importorskip("gradclip_plugin").AdaptiveGradientClipping, ())])
def test_rules_that_cannot_clip_complex_parameters_refuse_them_at_fit_start(tmp_path, cls, args):
    class Complex(TinyModel):
        def __init__(self):
            super().__init__()
            self.phase = nn.Parameter(torch.ones(3, dtype=torch.complex64))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.phase.abs().sum()

    with pytest.raises(MisconfigurationException, match=f"{cls.__name__} does not clip complex parameters"):
        make_trainer(tmp_path, [cls(*args)], max_steps=1).fit(Complex(), make_loader())


def test_complex_gradients_are_clipped_by_the_modulus_as_torch_does(tmp_path):
    class Complex(TinyModel):
        def __init__(self):
            super().__init__()
            self.phase = nn.Parameter(torch.full((3,), 2 + 1j, dtype=torch.complex64))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + 100 * (self.phase * self.phase.conj()).real.sum()

    before, after = GradProbe(), GradProbe()
    make_trainer(tmp_path, [before, ClipByGlobalNorm(1.0), after], max_steps=1).fit(Complex(), make_loader())
    grads = [g.clone() for g in before.steps[0].values() if g is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))  # of the moduli
    assert total > 1.0
    for name, g in before.steps[0].items():
        torch.testing.assert_close(after.steps[0][name], g * (1.0 / total))


def test_a_run_of_skips_stops_the_fit_naming_the_count_and_the_first_step(tmp_path):
    cb = ClipByGlobalNorm(5.0, max_consecutive_skips=3)
    with pytest.warns(UserWarning, match="non-finite"):
        with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row were skipped, since global step 1"):
            make_trainer(tmp_path, [cb], max_steps=8).fit(NonFiniteModel("loss-inf", bad_steps=(1, 2, 3, 4)), make_loader())


def test_skips_broken_by_a_step_that_ran_do_not_stop_the_fit(tmp_path):
    cb = ClipByGlobalNorm(5.0, max_consecutive_skips=2)
    with pytest.warns(UserWarning, match="non-finite"):
        make_trainer(tmp_path, [cb], max_steps=6).fit(NonFiniteModel("loss-inf", bad_steps=(0, 2, 4)), make_loader())
    assert nonfinite_steps(cb) == {0: 3.0}


def test_a_run_of_device_skips_stops_the_fit_at_the_next_logging_step(tmp_path):
    cb = ClipByGlobalNorm(5.0, max_consecutive_skips=3)
    model = NonFiniteModel("loss-inf", bad_steps=range(1, 9), optimizer="adam")
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    trainer = make_trainer(tmp_path, [cb], logger=CSVLogger(tmp_path), max_steps=10, log_every_n_steps=5)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row were skipped, since global step 1"):
        trainer.fit(model, make_loader(n=64))
    assert trainer.global_step == 5  # noticed at the logging step after step 4, with no read before it
    assert "found_inf" not in trainer.optimizers[0].__dict__  # nothing left on the optimizer


def test_a_monitor_with_nothing_selected_for_one_optimizer_logs_the_other(tmp_path):
    from gradclip_plugin import GradientNormMonitor

    logger = CSVLogger(tmp_path)
    monitor = GradientNormMonitor(weight_norms=True, update_ratio=True, include=["encoder.*"])
    make_trainer(tmp_path, [monitor], logger=logger, max_steps=2).fit(TwoOptimizerModel(), make_loader())
    keys = {k for k in read_metrics(logger) if k.startswith("grad_norm")}
    assert "grad_norm/opt0/weight/encoder" in keys and "grad_norm/opt0/update_ratio/encoder" in keys
    assert not any(k.startswith("grad_norm/opt1/") for k in keys)


# --- found by attacking the package a second time ------------------------------------------------------


def _fused_adam_model(bad_steps):
    model = NonFiniteModel("loss-inf", bad_steps=bad_steps, optimizer="adam")
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    return model


def test_device_skips_stop_the_fit_without_a_logger(tmp_path):
    # no logger writes the metrics: the run of skips is read every `max_consecutive_skips` steps instead
    trainer = make_trainer(tmp_path, [ClipByGlobalNorm(5.0, max_consecutive_skips=3)], max_steps=30)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row were skipped, since global step 2"):
        trainer.fit(_fused_adam_model(range(2, 30)), make_loader(n=128))
    assert trainer.global_step <= 6


def test_a_run_of_device_skips_that_ends_before_the_log_still_stops_the_fit(tmp_path):
    trainer = make_trainer(tmp_path, [ClipByGlobalNorm(5.0, max_consecutive_skips=3)], logger=CSVLogger(tmp_path),
                           max_steps=12, log_every_n_steps=10)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row were skipped, since global step 2"):
        trainer.fit(_fused_adam_model(range(2, 6)), make_loader(n=64))  # steps 6 to 9 run again before the log


def test_norm_max_and_total_max_survive_a_resume_in_the_middle_of_a_logging_interval(tmp_path):
    from gradclip_plugin import GradientNormMonitor

    class Spike(TinyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e4 if self.global_step == 3 else loss

    def run(steps, ckpt=None, version=None):
        cbs = [GradientNormMonitor(), ClipByGlobalNorm(1e9)]
        logger = CSVLogger(tmp_path, version=version)
        trainer = make_trainer(tmp_path, cbs, logger=logger, max_steps=steps, log_every_n_steps=10)
        torch.manual_seed(0)
        trainer.fit(Spike(), make_loader(n=64), ckpt_path=ckpt)
        return trainer, logger

    _, whole = run(10, version="whole")
    trainer, _ = run(5, version="first")
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed = run(10, tmp_path / "mid.ckpt", version="resumed")
    for key in ("grad_norm/total_max", "grad_clip/norm_max"):
        assert read_metrics(resumed)[key] == read_metrics(whole)[key], key  # the spike at step 3 is in both
        assert read_metrics(whole)[key][9] > 100


def test_the_monitors_total_max_covers_every_step_of_a_batch_with_two(tmp_path):
    from gradclip_plugin import GradientNormMonitor

    probe, logger = GradProbe(), CSVLogger(tmp_path)
    make_trainer(tmp_path, [probe, GradientNormMonitor()], logger=logger, max_steps=4).fit(TwoStepsPerBatchModel(), make_loader())
    norms = [vec_norm([g for g in s.values() if g is not None], 2.0) for s in probe.steps]
    logged = read_metrics(logger)["grad_norm/total_max"]
    assert list(logged.values()) == pytest.approx([max(norms[0:2]), max(norms[2:4])], rel=1e-5)


def test_a_new_optimizer_at_a_gone_ones_index_starts_afresh_but_a_loaded_state_is_kept():
    from gradclip_plugin import AutoClip

    def fold(cb, seed):
        torch.manual_seed(seed)
        net = nn.Linear(4, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4) * 10).pow(2).mean().backward()
            cb.clip_gradients(net, opt)
            opt.step()
        return cb._states[0].history

    reused = AutoClip()
    fold(reused, 0)
    import gc

    gc.collect()  # the first fold's optimizer is gone: the second gets its index
    assert fold(reused, 1) == fold(AutoClip(), 1)  # as a new callback's, not the first fold's history continued
    resumed = AutoClip()
    resumed.load_state_dict(copy.deepcopy(reused.state_dict()))
    assert len(fold(resumed, 2)) == 6  # a state loaded before the first call is continued


def test_a_step_left_to_the_loss_scaler_is_not_scaled(tmp_path):
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    m = nn.Module()
    m.a, m.b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    fm, fo = fabric.setup(m, torch.optim.SGD(m.parameters(), lr=0.1))
    for cb in (ClipByGlobalNorm(1.0), pytest.importorskip("gradclip_plugin").ZClip(warmup_steps=1, max_norm=None)):
        fo.zero_grad()
        fabric.backward((m.a * float("inf")).sum() + (m.b * 0.1).sum())
        metrics = cb.clip_gradients(fm, fo, fabric=fabric)
        torch.testing.assert_close(m.b.grad, torch.full((2,), 0.1))  # as the scaler left it, not times max_norm / inf
        assert metrics["grad_clip/nonfinite_steps"] == 1.0 and "grad_clip/norm_clipped" not in metrics
        fo.step()


def test_a_loop_refuses_complex_parameters_at_the_first_call_where_the_rule_cannot_clip_them():
    net = nn.Linear(2, 2)
    net.phase = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 2)).sum().add(net.phase.abs().sum()).backward()
    with pytest.raises(ValueError, match="ClipByValue does not clip complex parameters"):
        ClipByValue(1e9).clip_gradients(net, opt)  # at once, not at the first step whose values exceed the bound
