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
from gradclip_plugin.tensorboard import CATEGORY


def read_layout(path) -> dict:
    """The last custom-scalars layout written in the event files under ``path``, ``{}`` if none.

    What `write_layout` wrote: ``{category: {chart title: ["Multiline", [tag regexes]]}}``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    tag = "custom_scalars__config__"
    if tag not in acc.Tags().get("tensors", []):
        return {}
    proto = layout_pb2.Layout()
    proto.ParseFromString(acc.Tensors(tag)[-1].tensor_proto.string_val[0])
    return {
        category.title: {chart.title: ["Multiline", list(chart.multiline.tag)] for chart in category.chart}
        for category in proto.category
    }


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
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert charts["grad_clip: norm, norm_clipped, threshold"] == [
        "Multiline", ["^grad_clip/norm$", "^grad_clip/norm_clipped$", "^grad_clip/threshold$"]
    ]
    assert charts["clip_rate"] == ["Multiline", ["^grad_clip/clip_rate$"]]
    assert len(charts) == 3
    tags = scalar_tags(logger.log_dir)
    assert_every_chart_has_its_tags(charts, tags)
    # the monitor's chart takes its own curves and no one else's
    monitor_chart = charts["grad_norm: total and per-group norms"][1]
    assert sorted(t for t in tags if any(re.search(r, t) for r in monitor_chart)) == [
        "grad_norm/encoder", "grad_norm/head", "grad_norm/total"
    ]


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
    assert charts["grad_clip: norm, norm_clipped, threshold"][1][0] == "^train\\-grad_clip/norm$"
    tags = scalar_tags(logger.log_dir)
    assert "train-grad_clip/norm" in tags
    assert_every_chart_has_its_tags(charts, tags)


def test_the_rule_text_follows_the_logger_prefix_so_the_report_finds_it(tmp_path):
    from gradclip_plugin.report import summarize

    logger = TensorBoardLogger(tmp_path, name="run", version=0, prefix="train")
    fit(tmp_path, [ClipByValue(0.5)], logger=logger)
    (s,) = summarize(logger.log_dir)
    assert (s.prefix, s.rule, s.parameter) == ("train-grad_clip", "ClipByValue", "clip_value")


def test_written_once_for_all_callbacks(tmp_path, monkeypatch):
    calls = []
    original = SummaryWriter.add_custom_scalars
    monkeypatch.setattr(SummaryWriter, "add_custom_scalars", lambda self, lay: calls.append(lay) or original(self, lay))
    _, logger = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0), GradientNormMonitor(log_prefix="post")])
    assert len(calls) == 1
    assert set(calls[0][CATEGORY]) == {
        "grad_norm: total and per-group norms", "grad_clip: norm, norm_clipped, threshold", "clip_rate",
        "post: total and per-group norms",
    }
    assert read_layout(logger.log_dir) == calls[0]


def test_nothing_without_tensorboard_or_gradclip_callbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(SummaryWriter, "add_custom_scalars", lambda *a: pytest.fail("layout written"))
    fit(tmp_path, [GradientNormMonitor()], logger=CSVLogger(tmp_path))
    _, logger = fit(tmp_path / "plain", [])
    assert read_layout(logger.log_dir) == {}


def test_a_new_rule_gets_its_chart_from_what_it_logs(tmp_path):
    # the layout asks each callback what it logs: a rule written outside the package is charted like the others
    from gradclip_plugin.callbacks.base import ClipStats, GradientClipCallback

    class Halve(GradientClipCallback):
        def clip_(self, grads, params, step):
            torch._foreach_mul_(grads, 0.5)
            return ClipStats(step.norm, step.norm * 0.5, 0.0, True)

    _, logger = fit(tmp_path, [Halve(log_prefix="halve"), ClipByGlobalNorm(1.0)])
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert charts["halve: norm, norm_clipped, threshold"][1] == ["^halve/norm$", "^halve/norm_clipped$", "^halve/threshold$"]
    assert charts["clip_rate"][1] == ["^halve/clip_rate$", "^grad_clip/clip_rate$"]
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_each_clipping_callback_says_what_it_is_for_the_report(tmp_path):
    _, logger = fit(tmp_path, [ClipByValue(5.0), ClipByGlobalNorm(1.0)])
    acc = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"] if "callback" in t}
    assert texts == {"grad_clip/ClipByValue/callback/text_summary": "ClipByValue",
                     "grad_clip/ClipByGlobalNorm/callback/text_summary": "ClipByGlobalNorm"}


def test_clipping_callback_alone_writes_the_layout(tmp_path):
    trainer, logger = fit(tmp_path, [ClipByGlobalNorm(1.0)])
    assert read_layout(logger.log_dir)[CATEGORY]["grad_clip: norm, norm_clipped, threshold"] == [
        "Multiline",
        ["^grad_clip/norm$", "^grad_clip/norm_clipped$", "^grad_clip/threshold$"],
    ]
