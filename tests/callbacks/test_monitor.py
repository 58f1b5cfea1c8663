"""GradientNormMonitor on a real Trainer: logged values against norms of gradients a probe recorded."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
from helpers import GradProbe, TinyModel, TwoOptimizerModel, make_loader, make_trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradclip_plugin.callbacks import ClipByGlobalNorm, ClipByNorm, ClipByValue
from gradclip_plugin.callbacks.base import auto_depth, group_of
from gradclip_plugin.callbacks.monitor import GradientNormMonitor

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


# --- readers and references -----------------------------------------------------------------------


def tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(f"{log_dir}/metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def reference_norm(grads: list[torch.Tensor], norm_type: float) -> float:
    """The definition: the norm of all gradients flattened into one float64 vector."""
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]), norm_type).item()


def expected(probe: GradProbe, groups: dict[str, str], norm_type: float, steps: list[int], prefix="grad_norm"):
    """{metric: [(step, norm)]} at ``steps`` from the probe's gradients; ``groups`` maps fnmatch prefix -> group."""
    out: dict[str, list[tuple[int, float]]] = {}
    totals = [reference_norm([g for g in s.values() if g is not None], norm_type) for s in probe.steps]
    for before, step in zip([-1, *steps], steps):
        grads = {name: g for name, g in probe.steps[step].items() if g is not None}
        out.setdefault(f"{prefix}/total", []).append((step, reference_norm(list(grads.values()), norm_type)))
        # the largest total of every step since the last log, logged or not
        out.setdefault(f"{prefix}/total_max", []).append((step, max(totals[before + 1 : step + 1])))
        out.setdefault(f"{prefix}/nonfinite_steps", []).append((step, 0.0))
        for start, group in groups.items():
            members = [g for name, g in grads.items() if name.startswith(start)]
            out.setdefault(f"{prefix}/{group}", []).append((step, reference_norm(members, norm_type)))
    return out


def assert_logged(logged, want, rel=1e-5):
    for key, points in want.items():
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
        assert [s for s, _ in logged[key]] == [s for s, _ in points], key
        for (_, got), (_, ref) in zip(logged[key], points):
            assert got == pytest.approx(ref, rel=rel), key


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensorboard_values_match_probe_gradients(tmp_path, norm_type):
    probe, monitor = GradProbe(), GradientNormMonitor(norm_type=norm_type)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=4)
    trainer.fit(TinyModel(), make_loader())
    logged = tb_scalars(logger.log_dir)
    assert set(logged) == {"grad_norm/total", "grad_norm/total_max", "grad_norm/encoder", "grad_norm/head", "grad_norm/nonfinite_steps"}
    want = expected(probe, {"encoder.": "encoder", "head.": "head"}, norm_type, [0, 1, 2, 3])
    assert_logged(logged, want)


def test_csv_logger_values_and_log_every_n_steps(tmp_path):
    probe, monitor = GradProbe(), GradientNormMonitor()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=8, log_every_n_steps=3)
    trainer.fit(TinyModel(), make_loader())
    logged = csv_scalars(logger.log_dir)
    # Lightning's convention: log after steps 3, 6, ... i.e. at step indices 2 and 5
    want = expected(probe, {"encoder.": "encoder", "head.": "head"}, 2.0, [2, 5])
    assert {k for k in logged if k.startswith("grad_norm")} == set(want)
    assert_logged(logged, want)


def test_log_every_n_steps_matches_lightning_self_log(tmp_path):
    """The monitor logs at exactly the steps where `self.log(..., on_step=True)` values are written."""

    class Logged(TinyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loss", loss, on_step=True, on_epoch=False)
            return loss

    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [GradientNormMonitor()], logger=logger, max_steps=11, log_every_n_steps=4)
    trainer.fit(Logged(), make_loader(n=64))
    logged = csv_scalars(logger.log_dir)
    assert [s for s, _ in logged["grad_norm/total"]] == [s for s, _ in logged["loss"]] == [3, 7]


class HostReadCounter:
    """Counts reads of tensor values to the host made from the given source files."""

    METHODS = ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch, *filenames: str):
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *args, __name=name, __original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename in filenames:
                    self.calls.append(__name)
                return __original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_one_pass_per_step_and_one_host_copy_per_logging_step(tmp_path, monkeypatch):
    import gradclip_plugin.callbacks.monitor as monitor_module

    passes = []
    original = monitor_module.tensor_norms
    monkeypatch.setattr(monitor_module, "tensor_norms", lambda *a, **k: passes.append(1) or original(*a, **k))
    import gradclip_plugin.functional.norms as norms_module

    import gradclip_plugin.callbacks.base as base_module  # write_metrics makes the copy

    reads = HostReadCounter(monkeypatch, monitor_module.__file__, norms_module.__file__, base_module.__file__)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [GradientNormMonitor()], logger=logger, max_steps=10, log_every_n_steps=5)
    trainer.fit(TinyModel(), make_loader(n=64))
    assert len(passes) == 10  # one fused norm pass a step: `total_max` misses no step
    assert reads.calls == ["tolist", "tolist"]  # one batched copy per logging step, no read on the 8 others


def test_without_logger_nothing_runs(tmp_path, monkeypatch):
    import gradclip_plugin.callbacks.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "tensor_norms", lambda *a, **k: pytest.fail("norms computed with no logger"))
    make_trainer(tmp_path, [GradientNormMonitor()], max_steps=3).fit(TinyModel(), make_loader())


# --- placement relative to a clipping callback ---------------------------------------------------


def test_before_clipping_logs_pre_clip_and_after_logs_post_clip(tmp_path):
    pre, post = GradientNormMonitor(), GradientNormMonitor(log_prefix="grad_norm_clipped")
    probe_after = GradProbe()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    clip = ClipByGlobalNorm(max_norm=1.0)
    trainer = make_trainer(tmp_path, [pre, clip, post, probe_after], logger=logger, max_steps=3)
    trainer.fit(TinyModel(), make_loader())
    logged = tb_scalars(logger.log_dir)
    for (_, ours), (_, theirs) in zip(logged["grad_norm/total"], logged["grad_clip/norm"]):
        assert ours == pytest.approx(theirs, rel=1e-6)
        assert ours > 1.0  # the input scale makes every step clip: pre-clip is above the threshold
    for (_, ours), (_, theirs) in zip(logged["grad_norm_clipped/total"], logged["grad_clip/norm_clipped"]):
        assert ours == pytest.approx(theirs, rel=1e-5)
        assert ours <= 1.0 + 1e-6
    want = expected(probe_after, {"encoder.": "encoder", "head.": "head"}, 2.0, [0, 1, 2], "grad_norm_clipped")
    assert_logged(logged, want)


# --- groups ---------------------------------------------------------------------------------------


def test_group_of_cuts_module_path():
    assert group_of("encoder.layers.0.weight", 1) == "encoder"
    assert group_of("encoder.layers.0.weight", 2) == "encoder.layers"
    assert group_of("encoder.layers.0.weight", 3) == "encoder.layers.0"
    assert group_of("encoder.layers.0.weight", 9) == "encoder.layers.0"
    assert group_of("scale", 1) == "scale"  # a parameter of the LightningModule itself
    assert group_of("encoder.layers.0.weight", "parameter") == "encoder.layers.0.weight"


def test_auto_depth_goes_below_a_single_wrapper_module_but_not_past_ten_groups():
    wrapped = ["model.embed.weight", "model.head.weight", "model.head.bias"]
    assert auto_depth(wrapped) == 2  # depth 1 gives one curve, "model"
    layers = ["embed.weight"] + [f"layers.{i}.w" for i in range(12)] + ["head.weight"]
    assert auto_depth(layers) == 1  # depth 2 would give 14 groups
    few = ["embed.weight"] + [f"layers.{i}.w" for i in range(4)] + ["head.weight"]
    assert auto_depth(few) == 2  # 6 groups
    assert auto_depth(["a.weight", "a.bias", "b.weight"]) == 1


class Nested(TinyModel):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x))) * self.scale


@pytest.mark.parametrize(
    "depth, groups",
    [
        (1, {"encoder.": "encoder", "head.": "head", "scale": "scale"}),
        (2, {"encoder.0.": "encoder.0", "encoder.2.": "encoder.2", "head.": "head", "scale": "scale"}),
        ("auto", {"encoder.0.": "encoder.0", "encoder.2.": "encoder.2", "head.": "head", "scale": "scale"}),
        ("parameter", {n: n for n in ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
                                      "head.weight", "head.bias", "scale"]}),
    ],
)
def test_group_depth(tmp_path, depth, groups):
    probe, monitor = GradProbe(), GradientNormMonitor(group_depth=depth)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=2)
    trainer.fit(Nested(), make_loader())
    logged = csv_scalars(logger.log_dir)
    want = expected(probe, groups, 2.0, [0, 1])
    assert {k for k in logged if k.startswith("grad_norm")} == set(want)
    assert_logged(logged, want)


def test_include_exclude(tmp_path):
    probe = GradProbe()
    monitor = GradientNormMonitor(group_depth="parameter", include=["encoder.*", "head.weight"], exclude=["*.bias"])
    logger = CSVLogger(tmp_path, name="run", version=0)
    make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=2).fit(TinyModel(), make_loader())
    logged = csv_scalars(logger.log_dir)
    assert {k for k in logged if k.startswith("grad_norm")} == {
        "grad_norm/total", "grad_norm/total_max", "grad_norm/encoder.weight", "grad_norm/head.weight",
        "grad_norm/nonfinite_steps",
    }
    for step, (_, total) in enumerate(logged["grad_norm/total"]):
        grads = probe.steps[step]
        assert total == pytest.approx(reference_norm([grads["encoder.weight"], grads["head.weight"]], 2.0), rel=1e-5)


def test_parameters_without_gradient_are_left_out(tmp_path):
    class Frozen(TinyModel):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)  # in the optimizer, never in the graph: its grad stays None

    probe = GradProbe()
    logger = CSVLogger(tmp_path, name="run", version=0)
    make_trainer(tmp_path, [probe, GradientNormMonitor()], logger=logger, max_steps=2).fit(Frozen(), make_loader())
    logged = csv_scalars(logger.log_dir)
    assert "grad_norm/unused" not in logged
    assert_logged(logged, expected(probe, {"encoder.": "encoder", "head.": "head"}, 2.0, [0, 1]))


def test_two_optimizers_log_per_optimizer(tmp_path):
    probe, monitor = GradProbe(), GradientNormMonitor()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=4)
    trainer.fit(TwoOptimizerModel(), make_loader())
    logged = csv_scalars(logger.log_dir)
    assert {k for k in logged if k.startswith("grad_norm")} == {
        "grad_norm/opt0/total", "grad_norm/opt0/encoder", "grad_norm/opt1/total", "grad_norm/opt1/head",
        "grad_norm/opt0/nonfinite_steps", "grad_norm/opt1/nonfinite_steps", "grad_norm/opt0/total_max",
        "grad_norm/opt1/total_max",
    }
    # Manual optimization: every optimizer.step() is a probe entry; the logging step index is
    # Lightning's (one per training batch), so both optimizers of batch k log at step k.
    for opt, group in [(0, "encoder"), (1, "head")]:
        grads = [s for s, o in zip(probe.steps, probe.optimizers) if o == opt]
        for key in (f"grad_norm/opt{opt}/total", f"grad_norm/opt{opt}/{group}"):
            values = [v for _, v in logged[key]]
            assert len(values) == len(grads) == 2
            for v, g in zip(values, grads):
                assert v == pytest.approx(reference_norm([t for t in g.values() if t is not None], 2.0), rel=1e-5)


def test_nonfinite_gradients_are_counted_not_raised_and_not_drawn(tmp_path):
    class Poison(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.head.bias.grad[0] = float("inf")

    class Heal(Callback):  # keeps the weights finite, so that every step sees one inf entry only
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            torch.nan_to_num_(pl_module.head.bias.grad, posinf=0.0)

    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [Poison(), GradientNormMonitor(), Heal()], logger=logger, max_steps=2)
    trainer.fit(TinyModel(), make_loader())
    logged = csv_scalars(logger.log_dir)
    # an inf norm is not written (a chart would draw the last finite value in its place): it is counted
    assert "grad_norm/total" not in logged and "grad_norm/head" not in logged
    assert logged["grad_norm/nonfinite_steps"] == [(0, 1.0), (1, 2.0)]
    assert all(math.isfinite(v) for _, v in logged["grad_norm/encoder"]) and len(logged["grad_norm/encoder"]) == 2
    assert nonfinite_steps_of(trainer) == {0: 2}  # kept in checkpoints


def nonfinite_steps_of(trainer):
    (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, GradientNormMonitor)]
    return monitor.state_dict()["nonfinite_steps"]


# --- weights and updates -------------------------------------------------------------------------


class WeightProbe(Callback):
    """Records the parameters before each optimizer step and after each batch (after its step)."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_norms_and_update_ratios_match_the_probed_weights(tmp_path, optimizer):
    torch.manual_seed(0)
    probe = WeightProbe()
    monitor = GradientNormMonitor(weight_norms=True, update_ratio=True)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=5, log_every_n_steps=2)
    trainer.fit(TinyModel(optimizer=optimizer), make_loader())
    logged = csv_scalars(logger.log_dir)
    for group in ("encoder", "head"):
        weights, ratios = logged[f"grad_norm/weight/{group}"], logged[f"grad_norm/update_ratio/{group}"]
        # at the steps the gradient norms are logged at, of the weights of that step
        assert [s for s, _ in weights] == [s for s, _ in ratios] == [s for s, _ in logged["grad_norm/total"]] == [1, 3]
        for (step, weight), (_, ratio) in zip(weights, ratios):
            before = [t for n, t in probe.before[step].items() if n.startswith(group)]
            delta = [probe.after[step][n] - t for n, t in probe.before[step].items() if n.startswith(group)]
            assert weight == pytest.approx(reference_norm(before, 2.0), rel=1e-5)
            assert ratio == pytest.approx(reference_norm(delta, 2.0) / reference_norm(before, 2.0), rel=1e-4)
            assert ratio > 0


def test_weights_are_copied_and_measured_on_logging_steps_only(tmp_path, monkeypatch):
    import gradclip_plugin.callbacks.base as base_module
    import gradclip_plugin.callbacks.monitor as monitor_module
    import gradclip_plugin.functional.norms as norms_module

    passes, copies = [], []
    original_norms, original_mul = monitor_module.tensor_norms, torch._foreach_mul
    monkeypatch.setattr(monitor_module, "tensor_norms", lambda *a, **k: passes.append(1) or original_norms(*a, **k))

    def mul(*args, **kwargs):  # the copy of the weights is a `_foreach_mul` made by the monitor
        if sys._getframe(1).f_code.co_filename == monitor_module.__file__:
            copies.append(1)
        return original_mul(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_mul", mul)
    reads = HostReadCounter(monkeypatch, monitor_module.__file__, norms_module.__file__, base_module.__file__)
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = GradientNormMonitor(weight_norms=True, update_ratio=True)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, max_steps=10, log_every_n_steps=5)
    trainer.fit(TinyModel(optimizer="adam"), make_loader(n=64))
    assert len(passes) == 10 + 2 * 2  # gradients at every step; weights and updates on the 2 logging steps only
    assert len(copies) == 2
    assert reads.calls == ["tolist", "tolist"]  # still one batched copy per logging step


def test_weight_norms_and_update_ratios_per_optimizer(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = GradientNormMonitor(weight_norms=True, update_ratio=True)
    make_trainer(tmp_path, [monitor], logger=logger, max_steps=4).fit(TwoOptimizerModel(), make_loader())  # 2 batches
    logged = csv_scalars(logger.log_dir)
    for opt, group in [(0, "encoder"), (1, "head")]:
        for what in ("weight", "update_ratio"):
            assert [s for s, _ in logged[f"grad_norm/opt{opt}/{what}/{group}"]] == [0, 1]
    assert not any("/weight/head" in k for k in logged if "/opt0/" in k)


# --- histograms -----------------------------------------------------------------------------------


def test_histograms_every_n_steps_hold_the_gradient_values(tmp_path):
    probe, monitor = GradProbe(), GradientNormMonitor(histogram_every_n_steps=3)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    make_trainer(tmp_path, [probe, monitor], logger=logger, max_steps=7).fit(TinyModel(), make_loader())
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    # in a section of their own (values, not norms), from the first step on
    assert sorted(acc.Tags()["histograms"]) == ["grad_values/grad_norm/encoder", "grad_values/grad_norm/head"]
    for group in ("encoder", "head"):
        events = acc.Histograms(f"grad_values/grad_norm/{group}")
        assert [e.step for e in events] == [0, 3, 6]
        for event in events:
            values = torch.cat([g.reshape(-1) for n, g in probe.steps[event.step].items() if n.startswith(group)])
            h = event.histogram_value
            assert h.num == values.numel()
            assert h.min == pytest.approx(values.min().item(), rel=1e-6)
            assert h.max == pytest.approx(values.max().item(), rel=1e-6)
            assert h.sum == pytest.approx(values.double().sum().item(), rel=1e-4, abs=1e-6)


def test_a_histogram_of_only_nonfinite_values_is_skipped_and_said_once(tmp_path):
    class Poison(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.head.bias.grad.fill_(float("nan"))
            pl_module.head.weight.grad.fill_(float("nan"))

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [Poison(), GradientNormMonitor(histogram_every_n_steps=1)], logger=logger, max_steps=3)
    with pytest.warns(UserWarning, match=r"no histogram of `head` at step 0: every gradient value is inf or NaN") as record:
        trainer.fit(TinyModel(), make_loader())
    assert sum("no histogram" in str(w.message) for w in record) == 1
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == ["grad_values/grad_norm/encoder"]


def test_histograms_need_a_tensorboard_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(histogram_every_n_steps=2)], logger=logger, max_steps=2)
    with pytest.warns(UserWarning, match="TensorBoardLogger only"):
        trainer.fit(TinyModel(), make_loader())


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(norm_type=0), "`norm_type` must be a positive number or 'inf', got 0"),
        (dict(norm_type="two"), "`norm_type` must be a positive number or 'inf', got 'two'"),
        (dict(group_depth=0), "`group_depth` must be a positive int, 'auto' or 'parameter', got 0"),
        (dict(group_depth="module"), "`group_depth` must be a positive int, 'auto' or 'parameter', got 'module'"),
        (dict(histogram_every_n_steps=0), "`histogram_every_n_steps` must be a positive int or None, got 0"),
        (dict(histogram_every_n_steps=2.5), "`histogram_every_n_steps` must be a positive int or None, got 2.5"),
        (dict(include="encoder.*"), "`include` must be a list of fnmatch patterns"),
        (dict(log_prefix=""), "`log_prefix` must be a non-empty string, got ''"),
        (dict(weight_norms="yes"), "`weight_norms` must be True or False, got 'yes'"),
        (dict(update_ratio=1), "`update_ratio` must be True or False, got 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        GradientNormMonitor(**kwargs)


def test_norm_type_inf_from_yaml_string():
    assert GradientNormMonitor(norm_type="inf").norm_type == math.inf


def test_two_monitors_with_one_prefix_are_refused(tmp_path):
    trainer = make_trainer(tmp_path, [GradientNormMonitor(), GradientNormMonitor()], max_steps=1)
    with pytest.raises(MisconfigurationException, match="share `log_prefix='grad_norm'`"):
        trainer.fit(TinyModel(), make_loader())


def test_include_matching_nothing_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [GradientNormMonitor(include=["decoder.*"])], max_steps=1)
    with pytest.raises(MisconfigurationException, match="'decoder.\\*' matches no parameter of TinyModel"):
        trainer.fit(TinyModel(), make_loader())


# --- per-group norms from a clipping callback's own pass -----------------------------------------


class CountNormPasses:
    """Counts the clipping callbacks' own ``tensor_norms`` calls (the monitor's are not counted)."""

    def __init__(self, monkeypatch):
        import gradclip_plugin.callbacks.base as base

        self.calls = 0
        original = base.tensor_norms

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(base, "tensor_norms", counted)


@pytest.mark.parametrize(
    "clip, norm_type",
    [(lambda: ClipByGlobalNorm(1.0, group_depth=1), 2.0), (lambda: ClipByNorm(0.5, norm_type=1.0, group_depth=1), 1.0),
     (lambda: ClipByValue(0.1, group_depth="parameter"), math.inf)],
    ids=["global", "per-tensor-1", "value"],
)
def test_a_clipping_callback_logs_pre_clip_group_norms_from_its_one_pass(tmp_path, monkeypatch, clip, norm_type):
    passes = CountNormPasses(monkeypatch)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    before, cb, after = GradProbe(), clip(), GradProbe()
    make_trainer(tmp_path, [before, cb, after], logger=logger, max_steps=4).fit(TinyModel(), make_loader())
    assert passes.calls == 4  # one pass per step, the group norms included
    logged = tb_scalars(logger.log_dir)
    names_all = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
    groups = {"encoder": names_all[:2], "head": names_all[2:]}
    if cb.group_depth == "parameter":
        groups = {n: [n] for n in names_all}
    for group, names in groups.items():
        series = logged[f"grad_clip/norm/{group}"]
        assert [s for s, _ in series] == [0, 1, 2, 3]
        for step, value in series:
            assert value == pytest.approx(reference_norm([before.steps[step][n] for n in names], norm_type), rel=1e-5)
    assert not any(torch.equal(before.steps[0][n], after.steps[0][n]) for n in names_all)  # pre-clip: it clipped


def test_clipping_group_norms_only_on_logging_steps_and_as_the_monitor_logs_them(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [GradientNormMonitor(group_depth=1), ClipByGlobalNorm(1.0, group_depth=1)]
    make_trainer(tmp_path, callbacks, logger=logger, max_steps=4, log_every_n_steps=2).fit(TinyModel(), make_loader())
    metrics = csv_scalars(logger.log_dir)
    for group in ("encoder", "head"):
        assert [s for s, _ in metrics[f"grad_clip/norm/{group}"]] == [1, 3]
        assert metrics[f"grad_clip/norm/{group}"] == metrics[f"grad_norm/{group}"]
