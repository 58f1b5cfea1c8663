"""SkipSpikes in a Trainer and in loops: its decisions against OLMo-core's ``SkipStepOptimizer`` on the losses
and norms the run recorded, skipped steps untouched, a NaN kept out of the windows, the record (CSV,
report, checkpoint), resume, accumulation, 16-mixed, several optimizers, ``max_consecutive_skips``."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from gradclip_plugin import ClipByGlobalNorm, SkipSpikes
from gradclip_plugin.callbacks.spikes import SkippedStep
from gradclip_plugin.functional import SpikeWindow
from helpers import make_trainer

from .test_clip import read_metrics

olmo = pytest.importorskip("olmo_core.optim.skip_step_optimizer", reason="the reference: pip install ai2-olmo-core==3.0.0")

STEPS, WINDOW, SIGMA = 40, 8, 3.0
SPIKES = {15: 20.0, 27: 8.0, 33: 30.0}  # step -> input scale: the loss and the norm spike
NAN_AT = 20


def batches(n: int = 4 * STEPS):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class SpikyModel(pl.LightningModule):
    """A linear regression whose input is scaled up at ``SPIKES`` steps, and whose loss is NaN at ``nan_at``."""

    def __init__(self, optimizer: str = "adamw", nan_at: int = NAN_AT, manual: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
        self.optimizer, self.nan_at, self.automatic_optimization = optimizer, nan_at, not manual

    def loss(self, batch):
        x, y = batch
        x = x * SPIKES.get(self.global_step // (2 if not self.automatic_optimization else 1), 1.0)
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        return loss * math.nan if self.global_step == self.nan_at else loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        for opt in self.optimizers():  # each optimizer on its own loss
            opt.zero_grad()
            self.manual_backward(self.loss(batch) * (1.0 if opt is self.optimizers()[0] else 2.0))
            opt.step()

    def configure_optimizers(self):
        make = {
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False),
            "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
        }[self.optimizer]
        if self.automatic_optimization:
            return make(self.parameters())
        return [make(self.net.parameters()), make(self.head.parameters())]


class Recorder(pl.Callback):
    """Before SkipSpikes: each optimizer step's loss (summed since the last step) and pre-skip norm; after
    the batch, whether its weights moved."""

    def __init__(self) -> None:
        self.loss, self.rows, self.before = None, [], None

    def on_before_backward(self, trainer, pl_module, loss):
        self.loss = loss.detach().clone() if self.loss is None else self.loss + loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.rows.append([optimizer, float(self.loss), float(norm), [p.detach().clone() for p in params]])
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, *args):
        for row in self.rows:
            if len(row) == 4:
                params = [p for g in row[0].param_groups for p in g["params"]]
                row.append(all(torch.equal(p, q) for p, q in zip(params, row[3])))  # skipped: nothing moved


def olmo_decisions(rows: list[tuple[float, float]], window: int = WINDOW, sigma: float = SIGMA) -> list[bool]:
    """OLMo-core's decisions over the finite rows, with a non-finite row skipped and left out of its window."""
    ref = olmo.SkipStepOptimizer([torch.zeros(1)], {}, rolling_interval_length=window, sigma_factor=sigma)
    out = []
    for loss, norm in rows:
        if not (math.isfinite(loss) and math.isfinite(norm)):
            out.append(True)
            continue
        ref.latest_loss, ref.latest_grad_norm = torch.tensor(loss), torch.tensor(norm)
        out.append(bool(ref.step_skipped))
    return out


def fit(tmp_path, model, cb, *, steps=STEPS, **kwargs):
    rec = Recorder()
    trainer = make_trainer(tmp_path, [rec, cb], max_steps=steps, **kwargs)
    trainer.fit(model, batches())
    return rec, trainer


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-fused", "sgd"])
def test_a_trainer_takes_olmo_cores_decisions_and_skipped_steps_change_nothing(tmp_path, optimizer):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA)
    model = SpikyModel(optimizer)
    rec, _ = fit(tmp_path, model, cb)
    skipped = [row[4] for row in rec.rows]
    assert skipped == olmo_decisions([(loss, norm) for _, loss, norm, *_ in rec.rows])
    assert skipped[NAN_AT] and skipped[15] and sum(skipped) < STEPS // 4
    assert [s.global_step for s in cb.skipped] == [i for i, s in enumerate(skipped) if s]
    if optimizer != "sgd":  # Adam's step count: the skipped steps did not count
        assert all(int(s["step"]) == STEPS - sum(skipped) for s in model.optimizers().optimizer.state.values())


def test_the_windows_stay_clean_after_a_nan(tmp_path):
    """The run with a NaN step decides the other steps as the run without it would, shifted by the step."""
    with_nan, _ = fit(tmp_path, SpikyModel(nan_at=NAN_AT), SkipSpikes(window=WINDOW, sigma=SIGMA))
    finite = [(loss, norm) for _, loss, norm, *_ in with_nan.rows]
    assert not math.isfinite(finite[NAN_AT][0])
    ours = [row[4] for row in with_nan.rows]
    assert ours[NAN_AT] and ours[:NAN_AT] + ours[NAN_AT + 1 :] == olmo_decisions(finite[:NAN_AT] + finite[NAN_AT + 1 :])


def test_the_record_is_written_to_csv_and_logged(tmp_path):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA)
    logger = CSVLogger(tmp_path)
    rec, trainer = fit(tmp_path, SpikyModel(), cb, logger=logger, log_every_n_steps=1)
    skipped = [i for i, row in enumerate(rec.rows) if row[4]]
    with open(f"{trainer.log_dir}/skipped_steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == skipped == [int(r["batch_idx"]) for r in rows]
    for r in rows:
        step = int(r["global_step"])
        loss, norm = rec.rows[step][1:3]
        assert float(r["loss"]) == pytest.approx(loss, rel=1e-6, nan_ok=True) and float(r["norm"]) == pytest.approx(norm, rel=1e-5, nan_ok=True)
    metrics = read_metrics(logger)
    assert metrics["grad_clip/skipped_steps"][STEPS - 1] == len(skipped) - 1  # the NaN step is a non-finite one
    assert metrics["grad_clip/nonfinite_steps"][STEPS - 1] == 1
    assert "grad_clip/clip_rate" not in metrics  # it never clips: no clip rate
    assert 15 in metrics["grad_clip/norm"] and 15 not in metrics["grad_clip/norm_clipped"]  # a skipped step claims no post-clip norm


def test_a_resumed_run_continues_the_windows_exactly(tmp_path):
    """The resumed run decides as OLMo-core does on the first run's values followed by its own (Lightning
    restarts a plain loader's epoch on resume: the batches differ from an uninterrupted run's)."""
    first = SkipSpikes(window=WINDOW, sigma=SIGMA)
    before, trainer = fit(tmp_path / "a", SpikyModel(), first, steps=25)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    second, after = SkipSpikes(window=WINDOW, sigma=SIGMA), Recorder()
    make_trainer(tmp_path / "b", [after, second], max_steps=STEPS).fit(SpikyModel(), batches(), ckpt_path=tmp_path / "mid.ckpt")
    rows = before.rows + after.rows
    expected = olmo_decisions([(loss, norm) for _, loss, norm, *_ in rows])
    assert [row[4] for row in rows] == expected and sum(expected[25:]) >= 2
    assert [s.global_step for s in second.skipped] == [i for i, s in enumerate(expected) if s]  # the first run's too


def test_under_accumulation_the_loss_is_the_mean_of_the_window(tmp_path):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA, watch="loss")
    seen = []
    original = cb.clip_
    cb.clip_ = lambda grads, params, step: (seen.append(float(cb._step_loss)), original(grads, params, step))[1]

    class Recording(SpikyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.batch_losses.append(float(loss))  # each micro-batch's own loss, before Lightning divides it
            return loss

    model = Recording(nan_at=-1)
    model.batch_losses = []
    fit(tmp_path, model, cb, steps=6, accumulate_grad_batches=2)
    assert seen == pytest.approx([(a + b) / 2 for a, b in zip(model.batch_losses[::2], model.batch_losses[1::2])])
    assert len(seen) == 6


def test_16_mixed_unscales_the_loss(tmp_path):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA, watch="loss")
    seen = []
    original = cb.clip_
    cb.clip_ = lambda grads, params, step: (seen.append(float(cb._step_loss)), original(grads, params, step))[1]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    from pytorch_lightning.plugins import MixedPrecision

    rec, _ = fit(tmp_path, SpikyModel(nan_at=-1), cb, steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert seen == pytest.approx([row[1] / 1024.0 for row in rec.rows])  # the recorder saw the scaled loss


def test_several_optimizers_keep_a_window_each_on_their_own_loss(tmp_path):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA)
    model = SpikyModel(manual=True, nan_at=-1)
    rec, _ = fit(tmp_path, model, cb, steps=2 * STEPS)
    for k, opt in enumerate(model.optimizers()):
        rows = [row for row in rec.rows if row[0] is opt.optimizer]
        assert [row[4] for row in rows] == olmo_decisions([(loss, norm) for _, loss, norm, *_ in rows])
        assert sum(row[4] for row in rows) >= 2
    assert set(cb._windows) == {0, 1}


def test_max_consecutive_skips_stops_the_fit_and_the_csv_still_lists_the_steps(tmp_path):
    cb = SkipSpikes(window=WINDOW, sigma=SIGMA, max_consecutive_skips=3)

    class AlwaysNaN(SpikyModel):
        def loss(self, batch):
            return super().loss(batch) * (math.nan if self.global_step >= 10 else 1.0)

    trainer = make_trainer(tmp_path, [cb], max_steps=STEPS, logger=TensorBoardLogger(tmp_path))
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row were skipped, since global step 10"):
        trainer.fit(AlwaysNaN(nan_at=-1), batches())
    with open(f"{trainer.log_dir}/skipped_steps.csv") as f:
        assert [int(r["global_step"]) for r in csv.DictReader(f)] == [10, 11, 12]


def test_placed_first_it_sees_the_pre_clip_norm_and_the_clip_still_applies(tmp_path):
    skip, clip = SkipSpikes(window=WINDOW, sigma=SIGMA), ClipByGlobalNorm(0.5)
    rec = Recorder()
    make_trainer(tmp_path, [rec, skip, clip], max_steps=STEPS).fit(SpikyModel(), batches())
    assert [row[4] for row in rec.rows] == olmo_decisions([(loss, norm) for _, loss, norm, *_ in rec.rows])
    assert skip.state_dict()["tallies"][0]["skipped"] >= 2


@pytest.mark.parametrize("loop", ["plain", "fabric"])
def test_a_loop_takes_the_trainers_decisions(tmp_path, loop):
    rec, _ = fit(tmp_path, SpikyModel("adamw-fused"), SkipSpikes(window=WINDOW, sigma=SIGMA))
    model, cb, fabric = SpikyModel("adamw-fused"), SkipSpikes(window=WINDOW, sigma=SIGMA), None
    opt = model.configure_optimizers()
    if loop == "fabric":
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        model, opt = fabric.setup(model, opt)
    skipped = []
    for step, batch in enumerate(batches()):
        if step == STEPS:
            break
        before = [p.detach().clone() for p in model.parameters()]
        x, y = batch
        loss = nn.functional.mse_loss(model.head(model.net(x * SPIKES.get(step, 1.0))), y) * (math.nan if step == NAN_AT else 1.0)
        fabric.backward(loss) if fabric is not None else loss.backward()
        cb.clip_gradients(model, opt, loss=loss, fabric=fabric, metrics=False)
        opt.step()
        opt.zero_grad()
        skipped.append(all(torch.equal(p, q) for p, q in zip(model.parameters(), before)))
    assert skipped == [row[4] for row in rec.rows]
    assert [s.global_step for s in cb.skipped] == [i for i, s in enumerate(skipped) if s]
    cb.to_csv(tmp_path / "skipped.csv")
    assert (tmp_path / "skipped.csv").read_text().splitlines()[0] == "global_step,batch_idx,optimizer,loss,norm"


def test_a_loop_must_pass_the_loss_unless_only_the_norm_is_watched():
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs the step's loss: pass `loss=loss`"):
        SkipSpikes().clip_gradients(model, opt)
    assert SkipSpikes(watch="norm").clip_gradients(model, opt)["grad_clip/skipped_steps"] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"window": 1}, "`window` must be an integer of at least 2"), ({"sigma": 0}, "`sigma` must be a positive number"),
     ({"watch": "grad"}, "`watch` must be one of"), ({"window": 12.5}, "`window`")],
)  # fmt: skip
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SkipSpikes(**kwargs)


@pytest.mark.parametrize("saved_watch, window, watch", [("both", 8, "both"), ("both", 8, "loss"), ("both", 4, "norm"), ("loss", 4, "norm")])
def test_a_checkpoint_of_another_window_or_watch_is_warned_about_and_its_windows_dropped(saved_watch, window, watch):
    saved = SkipSpikes(window=4, watch=saved_watch)  # ("loss", 4, "norm"): the same shape, another column
    width = 2 if saved_watch == "both" else 1
    saved._windows[0] = SpikeWindow(torch.arange(4.0 * width).reshape(4, width), torch.tensor(4))
    saved._skipped = [SkippedStep(3, 3, 0, 1.5, 99.0)]
    state = saved.state_dict()
    fresh = SkipSpikes(window=window, watch=watch)
    with pytest.warns(UserWarning, match=f"not of `window={window}, watch={watch!r}`; they start afresh"):
        fresh.load_state_dict(state)
    assert fresh._windows == {} and fresh.skipped == [SkippedStep(3, 3, 0, 1.5, 99.0)]  # the record is kept
    same = SkipSpikes(window=4, watch=saved_watch)
    same.load_state_dict(state)
    assert torch.equal(same._windows[0].values, saved._windows[0].values) and int(same._windows[0].count) == 4


def test_a_batch_whose_loss_lightning_never_saw_is_refused_not_judged_on_an_old_loss(tmp_path):
    class BackwardByHand(SpikyModel):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()[0]
            opt.zero_grad()
            loss = self.loss(batch)
            self.manual_backward(loss) if batch_idx == 0 else loss.backward()  # the second bypasses Lightning
            opt.step()

    with pytest.raises(RuntimeError, match="Lightning passed no loss to `on_before_backward` in this batch"):
        make_trainer(tmp_path, [SkipSpikes()], max_steps=4).fit(BackwardByHand(manual=True, nan_at=-1), batches())


def test_lightnings_own_clipping_may_follow_it_as_it_only_skips(tmp_path):
    rec, trainer = fit(tmp_path, SpikyModel(), SkipSpikes(window=WINDOW, sigma=SIGMA), gradient_clip_val=1.0)
    assert [row[4] for row in rec.rows] == olmo_decisions([(loss, norm) for _, loss, norm, *_ in rec.rows])
    with pytest.raises(Exception, match="clips the gradients itself"):
        make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], gradient_clip_val=1.0).fit(SpikyModel(), batches())


def test_a_loop_takes_a_number_for_the_loss_and_refuses_a_vector():
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = SkipSpikes()
    for loss in (0.5, np.float32(0.5), torch.tensor([0.5])):
        cb.clip_gradients(model, opt, loss=loss, metrics=False)
    with pytest.raises(ValueError, match=r"`loss` must be the step's loss, one number .* got shape \(8,\)"):
        cb.clip_gradients(model, opt, loss=torch.ones(8))
