"""What TensorBoard shows: the custom-scalars layout (its charts, written once, every chart's tags present in the
run), each callback's text, the report's figure in the Images tab, and all of them from a Fabric loop."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyModel, TwoOptimizerModel, make_loader, make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradclip_plugin.callbacks import ClipByGlobalNorm, ClipByValue
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.tensorboard import CATEGORY, NO_MATPLOTLIB, write_fabric, write_figure


def read_layout(path) -> dict:
    """The last custom-scalars layout written in the event files under ``path``, ``{}`` if none:
    ``{category: {chart title: ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper]]}}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    tag = "custom_scalars__config__"
    if tag not in acc.Tags().get("tensors", []):
        return {}
    proto = layout_pb2.Layout()
    proto.ParseFromString(acc.Tensors(tag)[-1].tensor_proto.string_val[0])

    def chart(c):
        if c.HasField("margin"):
            return ["Margin", [t for sr in c.margin.series for t in (sr.value, sr.lower, sr.upper)]]
        return ["Multiline", list(c.multiline.tag)]

    return {category.title: {c.title: chart(c) for c in category.chart} for category in proto.category}


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
    """Each regex of each line chart, each tag of each margin chart, is a logged scalar."""
    for title, (kind, names) in charts.items():
        for name in names:
            found = any(re.search(name, tag) for tag in tags) if kind == "Multiline" else name in tags
            assert found, f"chart {title!r}: {name!r} matches none of {tags}"


CLIP = "what the optimizer received (line), the part clipped off (band)"
NORM = "pre-clip norm and threshold"


def test_layout_shows_the_post_clip_norm_and_the_part_clipped_off(tmp_path):
    _, logger = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0)])
    charts = read_layout(logger.log_dir)[CATEGORY]
    # with outliers ignored a spike leaves through a chart's top: the norm is clipped where it crosses the
    # threshold drawn beside it, the largest of the interval (norm_max) first
    assert charts[f"grad_clip: {NORM}"] == ["Multiline", ["^grad_clip/norm_max$", "^grad_clip/norm$", "^grad_clip/threshold$"]]
    # TensorBoard colours every series of a chart by run: a line (what the optimizer got) and a band up to
    # the pre-clip norm (what clipping removed) are told apart where three lines of one colour are not
    assert charts[f"grad_clip: {CLIP}"] == ["Margin", ["grad_clip/norm_clipped", "grad_clip/norm_clipped", "grad_clip/norm"]]
    assert charts["clip_rate"] == ["Multiline", ["^grad_clip/clip_rate$"]]
    assert charts["grad_norm/total"] == ["Multiline", ["^grad_norm/total_max$", "^grad_norm/total$"]]
    assert list(charts) == ["grad_norm/total", f"grad_clip: {NORM}", f"grad_clip: {CLIP}", "clip_rate"]  # callbacks' order
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_a_rule_that_skips_charts_its_skips_and_one_that_never_clips_has_no_clip_charts(tmp_path):
    from gradclip_plugin import SkipSpikes

    _, logger = fit(tmp_path, [SkipSpikes(window=2, watch="norm"), ClipByGlobalNorm(1.0, skip_above=1e9)])
    charts = read_layout(logger.log_dir)[CATEGORY]
    for rule in ("SkipSpikes", "ClipByGlobalNorm"):
        assert charts[f"grad_clip/{rule}: steps skipped"] == ["Multiline", [f"^grad_clip/{rule}/skipped_steps$"]]
    assert f"grad_clip/SkipSpikes: {CLIP}" not in charts and f"grad_clip/ClipByGlobalNorm: {CLIP}" in charts
    assert charts["clip_rate"] == ["Multiline", ["^grad_clip/ClipByGlobalNorm/clip_rate$"]]
    assert_every_chart_has_its_tags({k: v for k, v in charts.items() if "SkipSpikes: pre" not in k}, scalar_tags(logger.log_dir))


def test_layout_for_two_optimizers(tmp_path):
    _, logger = fit(tmp_path, [ClipByGlobalNorm(1.0), GradientNormMonitor()], model=TwoOptimizerModel())
    charts = read_layout(logger.log_dir)[CATEGORY]
    for i in (0, 1):
        assert charts[f"grad_clip/opt{i}: {CLIP}"][1][2] == f"grad_clip/opt{i}/norm"
        assert charts[f"grad_clip/opt{i}: {NORM}"][1][2] == f"^grad_clip/opt{i}/threshold$"
        assert f"grad_norm/opt{i}/total" in charts
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_layout_charts_weight_norms_and_update_ratios_per_group(tmp_path):
    _, logger = fit(tmp_path, [GradientNormMonitor(weight_norms=True, update_ratio=True)])
    charts = read_layout(logger.log_dir)[CATEGORY]
    # one chart per group: TensorBoard would draw a run's groups in one colour
    for what in ("weight", "update_ratio"):
        for group in ("encoder", "head"):
            assert charts[f"grad_norm/{what}/{group}"] == ["Multiline", [f"^grad_norm/{what}/{group}$"]]
    assert len(charts) == 5  # and the total's
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))
    _, logger = fit(tmp_path / "two", [GradientNormMonitor(update_ratio=True)], model=TwoOptimizerModel())
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert charts["grad_norm/opt0/update_ratio/encoder"] == ["Multiline", ["^grad_norm/opt0/update_ratio/encoder$"]]
    assert charts["grad_norm/opt1/update_ratio/head"] == ["Multiline", ["^grad_norm/opt1/update_ratio/head$"]]
    assert not any("weight" in title or "opt0/update_ratio/head" in title for title in charts)
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_layout_for_two_clipping_callbacks_sharing_a_prefix(tmp_path):
    _, logger = fit(tmp_path, [ClipByValue(5.0), ClipByGlobalNorm(1.0), GradientNormMonitor()])
    charts = read_layout(logger.log_dir)[CATEGORY]
    for rule in ("ClipByValue", "ClipByGlobalNorm"):
        assert f"grad_clip/{rule}: {CLIP}" in charts
        assert charts[f"grad_clip/{rule}: {NORM}"][1][2] == f"^grad_clip/{rule}/threshold$"
    assert len(charts["clip_rate"][1]) == 2
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_layout_follows_the_logger_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0, prefix="train")
    fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0)], logger=logger)
    charts = read_layout(logger.log_dir)[CATEGORY]
    assert charts[f"grad_clip: {CLIP}"][1][2] == "train-grad_clip/norm"
    assert charts["clip_rate"][1] == ["^train\\-grad_clip/clip_rate$"]
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
    assert set(calls[0][CATEGORY]) == {"grad_norm/total", f"grad_clip: {NORM}", f"grad_clip: {CLIP}", "clip_rate", "post/total"}
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
    assert charts[f"halve: {CLIP}"][1] == ["halve/norm_clipped", "halve/norm_clipped", "halve/norm"]
    assert charts["clip_rate"][1] == ["^halve/clip_rate$", "^grad_clip/clip_rate$"]
    assert_every_chart_has_its_tags(charts, scalar_tags(logger.log_dir))


def test_each_clipping_callback_says_what_it_is_for_the_report(tmp_path):
    _, logger = fit(tmp_path, [ClipByValue(5.0), ClipByGlobalNorm(1.0)])
    acc = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"] if "callback" in t}
    assert texts == {  # the class with its arguments, as the Text tab shows them
        "grad_clip/ClipByValue/callback/text_summary": "ClipByValue(clip_value=5.0, include=[], exclude=[], "
        "nonfinite='skip', max_consecutive_skips=100, group_depth=None, log_prefix='grad_clip', report_every_n_steps=None)",
        "grad_clip/ClipByGlobalNorm/callback/text_summary": "ClipByGlobalNorm(max_norm=1.0, norm_type=2.0, include=[], "
        "exclude=[], nonfinite='skip', skip_above=None, max_consecutive_skips=100, group_depth=None, log_prefix='grad_clip', "
        "report_every_n_steps=None)",
    }


def test_clipping_callback_alone_writes_the_layout(tmp_path):
    _, logger = fit(tmp_path, [ClipByGlobalNorm(1.0)])
    assert set(read_layout(logger.log_dir)[CATEGORY]) == {f"grad_clip: {NORM}", f"grad_clip: {CLIP}", "clip_rate"}


def tags(log_dir, kind: str) -> list[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={kind: 0})
    acc.Reload()
    return acc.Tags()[kind]


@pytest.mark.parametrize("prefix", ["", "train"])
def test_the_report_figure_goes_to_the_images_tab(tmp_path, prefix):
    trainer, logger = fit(tmp_path, [GradientNormMonitor(), ClipByGlobalNorm(1.0)], logger=TensorBoardLogger(tmp_path, prefix=prefix))
    tag_prefix = f"{prefix}-" if prefix else ""
    assert write_figure(logger.experiment, trainer.global_step, tag_prefix)  # the scalars still unflushed: it flushes
    logger.experiment.flush()
    assert f"{tag_prefix}clipping/report" in tags(logger.log_dir, "images")


def test_the_callbacks_write_the_figure_at_the_end_of_a_fit_and_every_report_every_n_steps(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(report_every_n_steps=2), ClipByGlobalNorm(1.0)], logger=logger, max_steps=5)
    trainer.fit(TinyModel(), make_loader())
    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("clipping/report")] == [2, 4, 5]  # every 2 steps, and at the end of the fit


def test_the_figure_shows_norm_max_the_threshold_the_part_clipped_off_and_where_a_run_broke_down():
    from gradclip_plugin.report import NormSummary, figure

    steps, norm = np.arange(6), np.array([1.0, 2.0, 3.0e4, np.nan, 2.0, 2.0])
    s = NormSummary(Path("run"), "grad_clip", "clip", steps, norm, "ClipByGlobalNorm", norm_clipped=np.fmin(norm, 5.0),
                    thresholds=np.full(6, 5.0), peaks=np.fmax(norm, [1, 9, 3e4, np.nan, 2, 2]), guarded=np.zeros(6, bool))
    s.norm_clipped[4] = np.nan  # a skipped step: its norm written, no post-clip norm
    (ax,) = figure([s], "run").axes
    labels = ax.get_legend_handles_labels()[1]
    assert ax.get_yscale() == "log"
    for label in ("largest\nsince the previous log", "at the logged step", "threshold", "clipped off", "skipped (1 logged steps)",
                  "non-finite norm\n(1 logged steps)", "broke down: a norm of 3e+04"):  # fmt: skip
        assert any(label in text.replace("\n", " ") or label in text for text in labels), (label, labels)


def test_without_matplotlib_no_figure_and_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning, match=re.escape('pip install "gradclip_plugin[report]"')):
        trainer, logger = fit(tmp_path, [ClipByGlobalNorm(1.0)])
    assert write_figure(logger.experiment, 2) is False
    logger.experiment.flush()
    assert tags(logger.log_dir, "images") == []


def test_fabric_gets_the_layout_the_rule_text_and_the_figure(tmp_path):
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger as FabricCSV, TensorBoardLogger as FabricTB

    from gradclip_plugin.report import summarize

    tb = FabricTB(tmp_path, name="run", version=0, prefix="fab")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[FabricCSV(tmp_path), tb])
    model = TinyModel()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    monitor, clip = GradientNormMonitor(group_depth=1), ClipByGlobalNorm(1.0)
    for step, (x, y) in enumerate(make_loader()):
        fabric.backward(torch.nn.functional.mse_loss(model(x), y))
        fabric.log_dict(monitor.gradient_norms(model, opt) | clip.clip_gradients(model, opt, fabric=fabric), step=step)
        opt.step()
        opt.zero_grad()
    assert write_fabric(fabric, monitor, clip, step=step)
    charts = read_layout(tb.log_dir)[CATEGORY]
    assert charts[f"grad_clip: {NORM}"][1] == ["^fab\\-grad_clip/norm_max$", "^fab\\-grad_clip/norm$", "^fab\\-grad_clip/threshold$"]
    assert charts["grad_norm/total"][1] == ["^fab\\-grad_norm/total_max$", "^fab\\-grad_norm/total$"]
    assert_every_chart_has_its_tags(charts, scalar_tags(tb.log_dir))
    assert "fab-clipping/report" in tags(tb.log_dir, "images")
    (s,) = summarize(tb.log_dir)  # the Text tab names the rule
    assert (s.prefix, s.rule, s.args["max_norm"]) == ("fab-grad_clip", "ClipByGlobalNorm", 1.0)
