"""The custom-scalars layout: its charts, written once, and every chart's tags present in the run."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import TinyModel, TwoOptimizerModel, make_loader, make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradclip_plugin.callbacks import ClipByGlobalNorm, ClipByValue
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.tensorboard import CATEGORY, layout, read_layout, write_layout


def scalar_tags(log_dir) -> list[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Tags()["scalars"]


def fit(tmp_path, callbacks, model=None, **kwargs):
    logger = kwargs.pop("logger", None) or TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, callbacks, logger=logger, max_steps=2, **kwargs)
    trainer.fit(model or TinyModel(), make_loader())
    return trainer, logger


def assert_every_chart_has_its_tags(charts: dict, tags: list[str]) -> None:
    """Each regex of each chart matches a logged scalar, as TensorBoard's dashboard would (``search``)."""
    for title, (kind, regexes) in charts.items():
        assert kind == "Multiline"
        for regex in regexes:
            assert any(re.search(regex, tag) for tag in tags), f"chart {title!r}: {regex!r} matches none of {tags}"


def test_layout_overlays_norm_norm_clipped_threshold(tmp_path):
    trainer, logger = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0)])
    charts = layout(trainer)[CATEGORY]
    assert charts["grad_clip: norm, norm_clipped, threshold"] == [
        "Multiline", ["^grad_clip/norm$", "^grad_clip/norm_clipped$", "^grad_clip/threshold$"]
    ]
    assert charts["clip_rate"] == ["Multiline", ["^grad_clip/clip_rate$"]]
    assert charts["monitored total norms and thresholds"] == ["Multiline", ["^grad_norm/total$", "^grad_clip/threshold$"]]
    tags = scalar_tags(logger.log_dir)
    assert_every_chart_has_its_tags(charts, tags)
    # the monitor's chart takes its own curves and no one else's
    monitor_chart = charts["grad_norm: total and per-group norms"][1]
    assert sorted(t for t in tags if any(re.search(r, t) for r in monitor_chart)) == [
        "grad_norm/encoder", "grad_norm/head", "grad_norm/total"
    ]
    assert read_layout(logger.log_dir) == layout(trainer)


def test_layout_for_two_optimizers(tmp_path):
    trainer, logger = fit(tmp_path, [ClipByGlobalNorm(1.0), GradientNormMonitor()], model=TwoOptimizerModel())
    charts = read_layout(logger.log_dir)[CATEGORY]
    for i in (0, 1):
        assert charts[f"grad_clip/opt{i}: norm, norm_clipped, threshold"] == [
            "Multiline", [f"^grad_clip/opt{i}/norm$", f"^grad_clip/opt{i}/norm_clipped$", f"^grad_clip/opt{i}/threshold$"]
        ]
        assert f"grad_norm/opt{i}: total and per-group norms" in charts
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_layout_for_two_clipping_callbacks_sharing_a_prefix(tmp_path):
    trainer, logger = fit(tmp_path, [ClipByValue(5.0), ClipByGlobalNorm(1.0), GradientNormMonitor()])
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert "grad_clip/ClipByValue: norm, norm_clipped, threshold" in charts
    assert "grad_clip/ClipByGlobalNorm: norm, norm_clipped, threshold" in charts
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_layout_follows_the_logger_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0, prefix="train")
    trainer, _ = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0)], logger=logger)
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert "train-grad_clip: norm, norm_clipped, threshold" in charts
    tags = scalar_tags(logger.log_dir)
    assert "train-grad_clip/norm" in tags
    assert_every_chart_has_its_tags(charts, tags)


def test_written_once_for_all_callbacks(tmp_path, monkeypatch):
    calls = []
    original = SummaryWriter.add_custom_scalars
    monkeypatch.setattr(SummaryWriter, "add_custom_scalars", lambda self, lay: calls.append(lay) or original(self, lay))
    trainer, _ = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0), GradientNormMonitor(log_prefix="post")])
    assert len(calls) == 1
    write_layout(trainer)  # again, by hand: nothing new to write
    assert len(calls) == 1
    assert calls[0] == layout(trainer)


def test_nothing_without_tensorboard_or_gradclip_callbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(SummaryWriter, "add_custom_scalars", lambda *a: pytest.fail("layout written"))
    fit(tmp_path, [GradientNormMonitor()], logger=CSVLogger(tmp_path))
    trainer, logger = fit(tmp_path / "plain", [])
    assert layout(trainer) == {}
    assert read_layout(logger.log_dir) == {}


def test_clipping_callback_alone_writes_the_layout(tmp_path):
    trainer, logger = fit(tmp_path, [ClipByGlobalNorm(1.0)])
    assert read_layout(logger.log_dir)[CATEGORY]["grad_clip: norm, norm_clipped, threshold"] == [
        "Multiline",
        ["^grad_clip/norm$", "^grad_clip/norm_clipped$", "^grad_clip/threshold$"],
    ]


# --- log_scalars: one event per step, the same record as TensorBoardLogger.log_metrics -----------


def _scalar_records(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("prefix", ["", "train"])
def test_log_scalars_writes_what_log_metrics_writes(tmp_path, prefix):
    from gradclip_plugin.tensorboard import log_scalars

    ours = TensorBoardLogger(tmp_path, name="ours", version=0, prefix=prefix)
    theirs = TensorBoardLogger(tmp_path, name="theirs", version=0, prefix=prefix)
    steps = [{"grad_norm/total": 3.25, "grad_clip/norm": 1e-30, "grad_clip/clip_rate": 0.5},
             {"grad_norm/total": float("nan"), "grad_clip/norm": float("inf"), "grad_clip/clip_rate": 1.0}]
    for step, metrics in enumerate(steps):
        assert log_scalars(ours, metrics, step)
        theirs.log_metrics(metrics, step=step)
    ours.finalize("success")
    theirs.finalize("success")
    records = _scalar_records(ours.log_dir)
    assert records.keys() == {(f"{prefix}-" if prefix else "") + k for k in steps[0]}
    assert str(records) == str(_scalar_records(theirs.log_dir))  # str: NaN == NaN


def test_log_scalars_leaves_other_loggers_and_overridden_log_metrics_alone(tmp_path):
    from gradclip_plugin.tensorboard import log_scalars

    class Custom(TensorBoardLogger):
        def log_metrics(self, metrics, step=None):
            super().log_metrics({k + "_custom": v for k, v in metrics.items()}, step)

    assert not log_scalars(CSVLogger(tmp_path), {"a": 1.0}, 0)
    assert not log_scalars(Custom(tmp_path, name="custom"), {"a": 1.0}, 0)


def test_callbacks_log_through_the_overridden_log_metrics(tmp_path):
    class Custom(TensorBoardLogger):
        def log_metrics(self, metrics, step=None):
            super().log_metrics({k + "_custom": v for k, v in metrics.items()}, step)

    _, logger = fit(tmp_path, [ClipByGlobalNorm(1.0)], logger=Custom(tmp_path, name="run", version=0))
    logger.finalize("success")
    assert "grad_clip/norm_custom" in scalar_tags(logger.log_dir)


# --- one event per step for every gradclip callback and optimizer --------------------------------


def _events_with_scalars(log_dir) -> list[tuple[int, set[str]]]:
    """(step, tags) of each event file record holding scalar summaries, in order."""
    import glob

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(glob.glob(str(log_dir / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            tags = {v.tag for v in event.summary.value if v.metadata.plugin_data.plugin_name == "scalars"}
            if tags:
                out.append((event.step, tags))
    return out


def test_a_steps_metrics_of_every_callback_and_optimizer_are_one_event(tmp_path, monkeypatch):
    # A monitor, then two clippers (one reads the norm for nonfinite="skip"), two optimizers: every
    # metric of a step reaches TensorBoard as one event, and the device values in one copy.
    reads = []
    monkeypatch.setattr("torch.Tensor.tolist", lambda t, _orig=torch.Tensor.tolist: reads.append(1) or _orig(t))
    callbacks = [GradientNormMonitor(), ClipByGlobalNorm(1.0, nonfinite="ignore"), ClipByValue(0.1, log_prefix="value")]
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, callbacks, logger=logger, max_steps=6, log_every_n_steps=1)
    trainer.fit(TwoOptimizerModel(), make_loader())  # 3 batches, each stepping both optimizers
    logger.finalize("success")
    events = _events_with_scalars(tmp_path / "run" / "version_0")
    per_step: dict[int, list[set[str]]] = {}
    for step, tags in events:
        per_step.setdefault(step, []).append(tags)
    assert sorted(per_step) == [0, 1, 2]
    for step, records in per_step.items():
        assert len(records) == 1, f"step {step}: {len(records)} events"
        prefixes = {tag.split("/")[0] for tag in records[0]}
        assert prefixes == {"grad_norm", "grad_clip", "value"}, records[0]
        assert any("/opt0/" in t for t in records[0]) and any("/opt1/" in t for t in records[0])
    assert len(reads) == len(per_step)  # one device-to-host copy per logged step, for all of it
