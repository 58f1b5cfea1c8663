"""``gradclip report`` on real runs' TensorBoard logs, against norms computed from probe gradients."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GradProbe, TinyModel, TwoOptimizerModel, make_loader, make_trainer
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from gradclip_plugin.callbacks import ClipByGlobalNorm
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.report import (
    _interval_weighted_mean,
    _round_down,
    _runs,
    format_summary,
    main,
    suggest_max_norm,
    summarize,
)

MAX_NORM = 90.0  # TinyModel's gradient norms at input scale 10 lie around 40 to 120: a few steps clip
STEPS = 40


def probe_norms(probe: GradProbe) -> np.ndarray:
    """The pre-clip global 2-norm of every optimizer step, from the recorded gradients (float64)."""
    return np.array([
        torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in step.values()])).item()
        for step in probe.steps
    ])


@pytest.fixture(scope="module")
def clipped_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    probe = GradProbe()
    logger = TensorBoardLogger(root, name="clipped", version="")
    trainer = make_trainer(root, [probe, ClipByGlobalNorm(MAX_NORM)], logger=logger, max_steps=STEPS, log_every_n_steps=2)
    trainer.fit(TinyModel(), make_loader(n=64))
    return Path(logger.log_dir), probe_norms(probe)


def test_summary_matches_probe_norms(clipped_run):
    run, norms = clipped_run
    (s,) = summarize(run)
    assert s.prefix == "grad_clip" and s.kind == "clip"
    logged = norms[1::2]  # log_every_n_steps=2: steps 1, 3, 5, ...
    assert list(s.steps) == list(range(1, STEPS, 2))
    np.testing.assert_allclose(s.norm, logged, rtol=1e-5)
    for p in (50, 90, 99):
        assert s.stats[f"p{p}"] == pytest.approx(np.percentile(logged, p), rel=1e-5)
    assert s.stats["max"] == pytest.approx(logged.max(), rel=1e-5)
    # the clip rate covers every step, logged or not
    expected_rate = np.mean(norms > MAX_NORM)
    assert 0 < expected_rate < 0.5, "precondition: a mix of clipped and unclipped steps, mostly unclipped"
    assert s.clip_rate == pytest.approx(expected_rate)
    assert s.threshold == MAX_NORM
    np.testing.assert_allclose(s.norm_clipped, np.minimum(logged, MAX_NORM), rtol=1e-5)
    assert s.nonfinite == 0 and s.nonfinite_scope == "all steps"
    # Under half the steps clipped: the median of the second half of the logged norms, rounded down
    recent = logged[len(logged) // 2 :]
    assert s.suggestion == _round_down(float(np.median(recent)))
    assert "median pre-clip norm over the last 10 logged steps" in s.reason


def test_console_script_prints_the_summary_and_writes_a_png(clipped_run):
    run, norms = clipped_run
    script = Path(sys.executable).parent / "gradclip"
    result = subprocess.run([str(script), "report", str(run)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    logged = norms[1::2]
    assert f"steps             {STEPS} ({len(logged)} logged)" in out
    shown = dict(re.findall(r"(p50|p90|p99|max) ([0-9.e+]+)", out))
    assert float(shown["p50"]) == pytest.approx(np.percentile(logged, 50), rel=1e-3)
    assert float(shown["max"]) == pytest.approx(logged.max(), rel=1e-3)
    assert f"clip rate         {np.mean(norms > MAX_NORM):.1%}" in out
    assert "non-finite steps  0 (counted on all steps)" in out
    assert re.search(r"suggested max_norm [0-9.]+\n      why: ", out)
    png = run / "gradclip_report.png"
    assert f"plot: {png}" in out
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def test_output_path(clipped_run, tmp_path):
    run, _ = clipped_run
    out = tmp_path / "plot.png"
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_event_files(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files (events.out.tfevents.*) under `LOGDIR`" in capsys.readouterr().err


def test_missing_logdir_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"`LOGDIR` {str(tmp_path / 'missing')!r} does not exist" in err


def test_several_runs_and_output(tmp_path, capsys):
    for name in ("a", "b"):
        logger = TensorBoardLogger(tmp_path, name=name, version="")
        make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], logger=logger, max_steps=2).fit(TinyModel(), make_loader())
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("run ") for line in out.splitlines()) == 2 and (tmp_path / "a" / "gradclip_report.png").exists()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "holds 2 runs" in capsys.readouterr().err


def test_nonfinite_steps_are_counted(tmp_path):
    class Poison(Callback):  # inf gradients at steps 1 and 4; ClipByGlobalNorm(nonfinite="skip") skips them
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step in (1, 4):
                pl_module.head.bias.grad[0] = float("inf")

    logger = TensorBoardLogger(tmp_path, name="run", version="")
    make_trainer(tmp_path, [Poison(), ClipByGlobalNorm(1.0)], logger=logger, max_steps=6).fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.nonfinite == 2 and s.nonfinite_scope == "all steps"
    assert len(s.steps) == 4  # skipped steps log no norm


def test_steps_the_rule_skipped_are_counted(tmp_path):
    from callbacks.test_clip import SpikeModel  # its step 2 has a norm above 1e4

    logger = TensorBoardLogger(tmp_path, name="run", version="")
    cb = ClipByGlobalNorm(5.0, skip_above=1e4)
    make_trainer(tmp_path, [cb], logger=logger, max_steps=4).fit(SpikeModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.skipped == int(cb.state_dict()["tallies"][0]["skipped"]) == 1
    assert "    skipped steps     1 (by the rule, counted on all steps)" in format_summary(s).splitlines()
    logger = TensorBoardLogger(tmp_path, name="plain", version="")
    make_trainer(tmp_path, [ClipByGlobalNorm(5.0)], logger=logger, max_steps=2).fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.skipped is None and "skipped" not in format_summary(s)


def test_monitor_only_and_two_optimizers(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="mon", version="")
    probe = GradProbe()
    make_trainer(tmp_path, [probe, GradientNormMonitor()], logger=logger, max_steps=4).fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert (s.kind, s.prefix, s.threshold, s.clip_rate) == ("monitor", "grad_norm", None, None)
    np.testing.assert_allclose(s.norm, probe_norms(probe), rtol=1e-5)

    logger = TensorBoardLogger(tmp_path, name="two", version="")
    make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], logger=logger, max_steps=2).fit(TwoOptimizerModel(), make_loader())
    assert [s.prefix for s in summarize(logger.log_dir)] == ["grad_clip/opt0", "grad_clip/opt1"]


# --- the suggestion, on hand-made series ----------------------------------------------------------


def test_suggestion_is_the_median_of_the_second_half():
    norms = np.array([900.0, 800.0, 700.0, 600.0, 5.0, 3.0, 4.0, 6.0, 2.0, 5.5])
    value, reason = suggest_max_norm(norms)
    assert value == 4.0  # the second half [5, 3, 4, 6, 2, 5.5][1:]... is [3, 4, 6, 2, 5.5]: median 4
    assert "Pascanu" in reason


def test_suggestion_hand_worked():
    norms = np.array([100.0, 90.0, 80.0, 70.0, 12.0, 14.0, 13.0, 50.0, 11.0, 13.5])
    value, _ = suggest_max_norm(norms)
    assert value == 13.0  # second half [14, 13, 50, 11, 13.5] -> median 13.5 -> two significant figures, down: 13


def test_suggestion_ignores_everything_after_the_first_nonfinite_norm():
    norms = np.array([9.0] * 6 + [3.0] * 6 + [math.inf] + [1000.0] * 10)
    value, reason = suggest_max_norm(norms)
    assert value == 3.0 and "before the run broke down (a non-finite norm, at logged step 12)" in reason


def test_suggestion_from_a_short_run_uses_every_step():
    value, reason = suggest_max_norm(np.array([30.0, 20.0, 10.0, 40.0, 50.0, 35.0]))
    assert value == 32.0 and "over 6 logged steps" in reason  # median 32.5, rounded down


def test_suggestion_for_a_run_that_diverged_at_once():
    value, reason = suggest_max_norm(np.array([78.3575, 8.2e12, math.nan, math.nan]))
    assert value == 78.0 and "only 1 logged step(s) came before the run broke down (a norm of 8.2e+12, unclipped" in reason
    value, reason = suggest_max_norm(np.array([math.nan, math.inf]))
    assert value is None and "no finite norm" in reason


def test_an_unclipped_explosion_ends_the_run_as_a_nonfinite_norm_does():
    # the demo's unclipped run: 78, 1100, then 9e4 wrecks the weights and the broken model's norms fade
    norms = np.array([78.0, 1.1e3, 9.3e4] + [0.4] * 100)
    value, reason = suggest_max_norm(norms)
    assert value == 78.0 and "before the run broke down (a norm of 9.3e+04, unclipped, at logged step 2)" in reason
    # the same spike, clipped, leaves a healthy run: its typical norm counts
    clipped = np.zeros(len(norms), dtype=bool)
    clipped[2] = True
    value, reason = suggest_max_norm(norms, clipped=clipped)
    assert value == 0.4 and "broke down" not in reason


def test_tight_clipping_that_kept_the_run_finite_is_kept():
    norms = np.full(20, 40.0)
    value, reason = suggest_max_norm(norms, threshold=1.0, clip_rate=1.0)
    assert value == 1.0 and reason.startswith("keep max_norm=1")
    value, reason = suggest_max_norm(norms, threshold=100.0, clip_rate=0.0)
    assert value == 40.0 and "hardly ever acted" in reason


@pytest.mark.parametrize(
    "x, want",
    [(78.3575, 78.0), (123.0, 120.0), (9.99, 9.9), (0.01234, 0.012), (5.0, 5.0), (0.0, 0.0),
     # already two figures: kept (binary floor(0.29 / 0.01) would give 0.28)
     (0.29, 0.29), (0.57, 0.57), (0.58, 0.58), (0.0029, 0.0029)],
)
def test_round_down_to_two_significant_figures(x, want):
    assert _round_down(x) == want  # exact: the suggestion is printed and pasted into configs


def test_interval_weighted_clip_rate():
    assert _interval_weighted_mean(np.array([1, 3, 5]), np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert _interval_weighted_mean(np.array([0, 4]), np.array([1.0, 0.0])) == pytest.approx(0.2)


def test_runs_of_consecutive_indices():
    assert _runs(np.array([2, 3, 4, 7])) == [(2, 4), (7, 7)]
    assert _runs(np.array([], dtype=int)) == []


# --- advice per rule ------------------------------------------------------------------------------


def _report_of(tmp_path, cb, steps: int = 12, name: str = "run"):
    logger = TensorBoardLogger(tmp_path, name=name, version="")
    make_trainer(tmp_path, [cb], logger=logger, max_steps=steps).fit(TinyModel(), make_loader(n=64))
    (s,) = summarize(logger.log_dir)
    return s


def test_clip_by_value_gets_a_clip_value_from_its_largest_entries(tmp_path):
    from gradclip_plugin import ClipByValue

    probe = GradProbe()
    logger = TensorBoardLogger(tmp_path, name="value", version="")
    make_trainer(tmp_path, [probe, ClipByValue(1e3)], logger=logger, max_steps=12).fit(TinyModel(), make_loader(n=64))
    (s,) = summarize(logger.log_dir)
    assert s.rule == "ClipByValue" and s.parameter == "clip_value"
    largest = np.array([max(g.abs().max().item() for g in step.values()) for step in probe.steps])
    np.testing.assert_allclose(s.norm, largest, rtol=1e-6)  # the logged norm is the largest |entry|
    assert s.suggestion == _round_down(float(np.median(largest[6:])))
    assert "largest |gradient entry|" in s.reason and "max_norm" not in s.reason
    assert "suggested clip_value" in _format(s) and "suggested max_norm" not in _format(s)


def _format(s) -> str:
    from gradclip_plugin.report import format_summary

    return format_summary(s)


@pytest.mark.parametrize(
    "make_cb, parameter, words",
    [
        (lambda: __import__("gradclip_plugin").ClipByNorm(5.0), "max_norm", "each tensor's norm"),
        (lambda: __import__("gradclip_plugin").AdaptiveGradientClipping(), "clip_factor", "AGC has no max_norm"),
        (lambda: __import__("gradclip_plugin").AutoClip(), "percentile", "no max_norm to choose"),
        (lambda: __import__("gradclip_plugin").ZClip(warmup_steps=3), "z_thresh", "moving mean and spread"),
    ],
    ids=["ClipByNorm", "AGC", "AutoClip", "ZClip"],
)
def test_other_rules_get_a_word_on_their_own_parameters_and_no_max_norm(tmp_path, make_cb, parameter, words):
    s = _report_of(tmp_path, make_cb())
    assert s.rule == type(make_cb()).__name__
    assert (s.parameter, s.suggestion) == (parameter, None) and words in s.reason
    assert f"suggested {parameter} -" in _format(s)


def test_a_short_finite_run_that_clipped_every_step_keeps_its_threshold(tmp_path):
    s = _report_of(tmp_path, ClipByGlobalNorm(1.0), steps=3)
    assert s.clip_rate == 1.0 and s.nonfinite == 0
    assert s.suggestion == 1.0 and s.reason.startswith("keep max_norm=1") and "non-finite" not in s.reason


def test_percentiles_say_how_many_finite_values_they_come_from():
    s = summarize_series(np.array([1.0, 2.0, math.nan, math.inf]))
    assert "(of 2 finite logged values)" in _format(s)


def summarize_series(norms: np.ndarray):
    from gradclip_plugin.report import NormSummary

    s = NormSummary(Path("."), "grad_norm", "monitor", np.arange(len(norms)), norms)
    finite = norms[np.isfinite(norms)]
    s.stats = {"p50": float(np.percentile(finite, 50))}
    return s


def test_a_closed_pipe_ends_the_report_quietly(clipped_run):
    run, _ = clipped_run
    script = Path(sys.executable).parent / "gradclip"
    result = subprocess.run(f"'{script}' report '{run}' | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("run ") and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_without_matplotlib_the_summary_is_printed_and_the_extra_named(clipped_run, monkeypatch, capsys):
    run, _ = clipped_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["report", str(run), "-o", str(run / "none.png")]) == 0
    out = capsys.readouterr().out
    assert "suggested max_norm" in out
    assert "plot: skipped, matplotlib is not installed (pip install 'gradclip_plugin[report]')" in out
    assert not (run / "none.png").exists()
