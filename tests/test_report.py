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
from pytorch_lightning import seed_everything
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from gradclip_plugin.callbacks import ClipByGlobalNorm
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.report import (
    ADVICE,
    _interval_weighted_mean,
    _round_down,
    breakdown,
    format_summary,
    main,
    parse_rule,
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
    seed_everything(0)
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
    # `norm_max` covers the step between two logs too: the largest of steps 0-1, 2-3, ...
    np.testing.assert_allclose(s.peaks, norms.reshape(-1, 2).max(axis=1), rtol=1e-5)
    assert s.stats["max"] == pytest.approx(norms.max(), rel=1e-5)
    # the clip rate covers every step, logged or not
    expected_rate = np.mean(norms > MAX_NORM)
    assert 0 < expected_rate < 0.5, "precondition: a mix of clipped and unclipped steps, mostly unclipped"
    assert s.clip_rate == pytest.approx(expected_rate)
    assert s.threshold == MAX_NORM
    np.testing.assert_allclose(s.norm_clipped, np.minimum(logged, MAX_NORM), rtol=1e-5)
    assert s.nonfinite == 0
    # the 95th percentile of the second half of the logged norms (the largest but one of 10), rounded
    # down; or MAX_NORM, kept if it clipped at most 15% of them and is within twice that value
    recent = logged[len(logged) // 2 :]
    p95 = _round_down(float(np.sort(recent)[-2]))
    if np.mean(recent > MAX_NORM) <= 0.15 and MAX_NORM <= 2 * p95:
        assert s.suggestion == MAX_NORM and s.reason.startswith(f"keep max_norm=90: it clipped {np.mean(recent > MAX_NORM):.0%} of")
        assert f"the last 10 logged steps (at most 15%) and is within 2x of their 95th percentile, {p95:g}." in s.reason
    else:
        assert s.suggestion == p95 and f"would have clipped {np.mean(recent > p95):.0%} of the last 10 logged steps" in s.reason


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
    assert float(shown["max"]) == pytest.approx(norms.max(), rel=1e-3)  # every step's, from `norm_max`
    assert f"clip rate         {np.mean(norms > MAX_NORM):.1%}" in out
    assert "non-finite steps  0\n" in out
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
    trainer = make_trainer(tmp_path, [Poison(), ClipByGlobalNorm(1.0)], logger=logger, max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.nonfinite == 2  # step 4 too, which was not logged
    assert list(s.steps) == [1, 3, 5] and list(np.isfinite(s.norm)) == [False, True, True]  # step 1's is not written
    assert "broke down" not in s.reason  # finite steps followed: the run went on


def test_steps_the_rule_skipped_are_counted(tmp_path):
    from callbacks.test_clip import SpikeModel  # its step 2 has a norm above 1e4

    logger = TensorBoardLogger(tmp_path, name="run", version="")
    cb = ClipByGlobalNorm(5.0, skip_above=1e4)
    make_trainer(tmp_path, [cb], logger=logger, max_steps=4).fit(SpikeModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.skipped == int(cb.state_dict()["tallies"][0]["skipped"]) == 1
    assert "    skipped steps     1 (by the rule)" in format_summary(s).splitlines()
    assert s.guarded[2] and "broke down" not in s.reason  # a spike it skipped broke nothing
    assert s.reason.endswith(" skip_above=10000 skipped 1 of the 4 steps (25%).")
    logger = TensorBoardLogger(tmp_path, name="plain", version="")
    make_trainer(tmp_path, [ClipByGlobalNorm(5.0)], logger=logger, max_steps=2).fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert s.skipped is None and "skipped" not in format_summary(s)


def test_monitor_only_and_two_optimizers(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="mon", version="")
    probe = GradProbe()
    make_trainer(tmp_path, [probe, GradientNormMonitor()], logger=logger, max_steps=4).fit(TinyModel(), make_loader())
    (s,) = summarize(logger.log_dir)
    assert (s.kind, s.prefix, s.threshold, s.clip_rate, s.rule) == ("monitor", "grad_norm", None, None, None)
    np.testing.assert_allclose(s.norm, probe_norms(probe), rtol=1e-5)

    logger = TensorBoardLogger(tmp_path, name="two", version="")
    make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], logger=logger, max_steps=2).fit(TwoOptimizerModel(), make_loader())
    assert [s.prefix for s in summarize(logger.log_dir)] == ["grad_clip/opt0", "grad_clip/opt1"]


# --- series read by step, from hand-written event files -------------------------------------------


def write_events(path: Path, rows: list[tuple[int, dict[str, float]]], rule: str = "ClipByGlobalNorm(max_norm=1.0)") -> Path:
    """An event file with ``rows`` written in order (a step may come twice), and the rule's text."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(path) as writer:
        writer.add_text("grad_clip/callback", rule)
        for step, values in rows:
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
    return path


def clip_row(norm: float, threshold: float = 1.0, nonfinite: int = 0, **extra: float) -> dict[str, float]:
    """What a clipping callback writes at one logged step (non-finite values left out, as it does)."""
    row = {"norm": norm, "norm_clipped": min(norm, threshold), "threshold": threshold, "clip_rate": float(norm > threshold)}
    row.update(nonfinite_steps=nonfinite, **extra)
    return {f"grad_clip/{k}": v for k, v in row.items() if math.isfinite(v)}


NORMS = [3.0, 2.0, 2.5, 1.5, 4.0, 2.25, 1.75, 2.5, 3.25, 1.75, 2.5, 2.0]  # exact in float32


@pytest.mark.parametrize("case", ["overflow", "skip"])
def test_a_run_with_a_skipped_or_nonfinite_step_is_read_by_step(tmp_path, capsys, case):
    rows = [(i, clip_row(n, nonfinite=0)) for i, n in enumerate(NORMS)]
    if case == "overflow":  # 16-mixed: an inf norm at step 5, not written, while norm_clipped and threshold were
        rows[5:] = [(i, {**r, "grad_clip/nonfinite_steps": 1.0}) for i, r in rows[5:]]
        del rows[5][1]["grad_clip/norm"]
    else:  # fused Adam, skip_above: step 5 (norm 1e4) skipped, so it writes no norm_clipped nor threshold
        rows[5] = (5, {"grad_clip/norm": 1e4, "grad_clip/nonfinite_steps": 0.0})
        rows = [(i, {**r, "grad_clip/skipped_steps": float(i >= 5)}) for i, r in rows]
    run = write_events(tmp_path / "run", rows)
    assert main(["report", str(tmp_path)]) == 0
    (s,) = summarize(run)
    assert list(s.steps) == list(range(12))
    i = 6  # each series at its own step: the threshold and clipped norm of step 6 beside step 6's norm
    assert (s.norm[i], s.norm_clipped[i], s.thresholds[i]) == (NORMS[i], 1.0, 1.0)
    assert (s.nonfinite, s.skipped) == ((1, None) if case == "overflow" else (0, 1))
    # the largest but one of the finite norms: 3.25 without step 5's inf, 4 with its 1e4
    assert "broke down" not in s.reason and s.suggestion == (3.2 if case == "overflow" else 4.0)
    assert "non-finite steps  1" in capsys.readouterr().out if case == "overflow" else s.guarded[5]


def test_a_step_written_twice_keeps_its_last_value(tmp_path):
    # gradient accumulation wrote step 3 twice: the last write is the step's
    rows = [(i, clip_row(n)) for i, n in enumerate(NORMS[:4])] + [(3, clip_row(9.0))]
    (s,) = summarize(write_events(tmp_path, rows))
    assert list(s.steps) == [0, 1, 2, 3] and s.norm[3] == 9.0 and s.norm_clipped[3] == 1.0


def test_a_spike_between_logs_is_seen_through_norm_max(tmp_path):
    # a monitor logging every 10 steps: the logged totals are ordinary, total_max at step 29 is not
    rows = [(s, {"grad_norm/total": 1.0, "grad_norm/total_max": 1e4 if s == 29 else 1.5, "grad_norm/nonfinite_steps": 0.0})
            for s in range(9, 100, 10)]  # fmt: skip
    (s,) = summarize(write_events(tmp_path / "mon", rows))
    assert s.kind == "monitor" and s.stats["max"] == 1e4 and s.stats["p99"] == 1.0
    assert "broke down (a norm of 1e+04, neither clipped nor skipped, by step 29)" in s.reason
    # in the first interval, the spike is compared with that interval's last norm; no step before it is known
    (s,) = summarize(write_events(tmp_path / "first", [(9, rows[2][1])] + rows[3:]))
    assert s.suggestion is None and s.reason.startswith(
        "no logged step came before the run broke down (a norm of 1e+04, neither clipped nor skipped, by step 9): log every step")
    # the same spike under a clipping callback's threshold of 2 was clipped: no breakdown
    rows = [(s, clip_row(1.0, 2.0, norm_max=1e4 if s == 29 else 1.5)) for s in range(9, 100, 10)]
    (s,) = summarize(write_events(tmp_path / "clip", rows))
    assert s.guarded[2] and "broke down" not in s.reason


class PoisonWeights(Callback):
    """Sets a weight to NaN before step ``at``: every later gradient is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.head.weight[0, 0] = math.nan


@pytest.mark.parametrize("make_cb", [GradientNormMonitor, lambda: ClipByGlobalNorm(90.0, nonfinite="ignore")], ids=["monitor", "clip"])
def test_a_run_whose_weights_went_nan_broke_down(tmp_path, make_cb):
    logger = TensorBoardLogger(tmp_path, name="run", version="")
    make_trainer(tmp_path, [PoisonWeights(9), make_cb()], logger=logger, max_steps=12).fit(TinyModel(), make_loader(n=64))
    (s,) = summarize(logger.log_dir)
    assert s.nonfinite == 3 and "    non-finite steps  3\n" in format_summary(s)  # steps 9, 10 and 11
    assert "before the run broke down (non-finite norms from step 9 on)" in s.reason
    assert "Clipping cannot repair inf/NaN gradients" in s.reason and not s.reason.startswith("keep")
    finite = s.norm[:9]
    assert s.suggestion == _round_down(float(np.sort(finite)[-2])) and "of 9 logged steps" in s.reason


@pytest.mark.parametrize("cb, parameter", [(ClipByGlobalNorm(1.0, skip_above=1.5), "skip_above"),
                                           (None, "skip_step_z_thresh")], ids=["skip_above", "ZClip"])  # fmt: skip
def test_a_run_that_skipped_most_steps_is_told_its_skip_threshold_is_too_low(tmp_path, cb, parameter):
    from gradclip_plugin import ZClip

    cb = cb or ZClip(z_thresh=0.1, skip_step_z_thresh=0.1, max_norm=None, warmup_steps=2)
    s = _report_of(tmp_path, cb)
    assert s.skipped > 6 and (s.parameter, s.suggestion) == (parameter, None)
    assert f"is too low: the rule skipped {s.skipped} of the 12 steps" in s.reason and "p99" in s.reason
    assert "keep" not in s.reason and "clip rate         100" not in format_summary(s)


# --- the suggestion, on hand-made series ----------------------------------------------------------

# 20 large first steps, then 1, 2, ..., 20: the second half is the last 20
RAMP = np.concatenate([np.full(20, 100.0), np.arange(1.0, 21.0)])


def test_the_suggestion_clips_the_spikes_and_says_how_many():
    value, reason = suggest_max_norm(RAMP)
    assert value == 19.0  # the 95th percentile of 1..20, "lower": the largest but one
    assert reason.startswith("max_norm 19 would have clipped 5% of the last 20 logged steps")
    assert "Pascanu" not in reason  # no borrowed authority for the percentile


def test_a_short_run_counts_every_step_and_says_the_figure_is_rough():
    value, reason = suggest_max_norm(np.array([30.0, 20.0, 10.0, 40.0, 50.0, 35.0]))
    assert value == 40.0 and "would have clipped 17% of 6 logged steps" in reason and "a rough figure" in reason


def test_the_suggestion_is_not_the_median():
    norms = np.random.default_rng(0).lognormal(0.0, 0.5, 400)
    value, reason = suggest_max_norm(norms)
    share = np.mean(norms[200:] > value)
    assert 0.05 <= share <= 0.10 and value > 1.5 * np.median(norms) and f"clipped {share:.0%} of" in reason


@pytest.mark.parametrize("threshold, keep", [(19.0, True), (17.0, True), (16.0, False), (38.0, True), (39.0, False), (10.0, False)])
def test_a_threshold_that_clips_the_spikes_is_kept(threshold, keep):
    value, reason = suggest_max_norm(RAMP, threshold)
    # kept: it clipped at most 15% of the window (17 clips 3 of 20, 16 clips 4) and is within twice the suggestion, 19
    assert (value == threshold) == keep and reason.startswith(f"keep max_norm={threshold:g}") == keep
    if not keep:
        assert value == 19.0 and f"The run's max_norm={threshold:g} clipped {np.mean(RAMP[20:] > threshold):.0%}" in reason


def test_tight_clipping_gets_the_spikes_threshold_and_a_word_on_it():
    value, reason = suggest_max_norm(np.full(20, 40.0), threshold=1.0)
    assert value == 40.0 and "max_norm=1 clipped 100% of them: most updates were scaled down" in reason


def test_a_run_clipped_at_its_suggestion_is_told_to_keep_it(tmp_path):
    def run(max_norm: float, name: str):
        seed_everything(0)
        logger = TensorBoardLogger(tmp_path, name=name, version="")
        make_trainer(tmp_path, [ClipByGlobalNorm(max_norm)], logger=logger, max_steps=60).fit(TinyModel(lr=1e-3), make_loader(n=64))
        return summarize(logger.log_dir)[0]

    first = run(MAX_NORM, "first")
    assert first.suggestion != MAX_NORM and "would have clipped" in first.reason, "precondition: a new value"
    second = run(first.suggestion, "second")
    assert second.suggestion == first.suggestion and second.reason.startswith(f"keep max_norm={first.suggestion:g}")


@pytest.mark.parametrize(
    "norms, expected",
    [
        (np.array([2.0, math.nan, 3.0, 2.5]), (4, "")),  # a step the scaler skipped: finite ones follow
        (np.array([2.0, 3.0, 2.5, math.nan, math.nan]), (3, "non-finite norms from step 3 on")),
        (np.array([2.0, 3.0, 400.0, 2.0]), (2, "a norm of 400, neither clipped nor skipped, by step 2")),
        (np.array([2.0, 3.0, 200.0, 2.0]), (4, "")),  # 200 is under 100 times the median before it, 2.5
    ],
)
def test_breakdown(norms, expected):
    assert breakdown(norms) == expected
    guarded = np.ones(len(norms), dtype=bool)
    assert breakdown(norms, guarded=guarded)[1] in ("", "non-finite norms from step 3 on")  # a clipped spike breaks nothing


def test_suggestion_for_a_run_that_diverged_at_once():
    value, reason = suggest_max_norm(np.array([78.3575, 8.2e12, math.nan, math.nan]))
    assert value == 78.0 and "only 1 logged step(s) came before the run broke down (a norm of 8.2e+12, neither" in reason
    value, reason = suggest_max_norm(np.array([math.nan, math.inf]))
    assert value is None and "no finite norm" in reason


def test_an_unclipped_explosion_ends_the_run_as_a_nonfinite_norm_does():
    # the demo's unclipped run: 78, 1100, then 9e4 wrecks the weights and the broken model's norms fade
    norms = np.array([78.0, 1.1e3, 9.3e4] + [0.4] * 100)
    value, reason = suggest_max_norm(norms)
    assert value == 78.0 and "before the run broke down (a norm of 9.3e+04, neither clipped nor skipped, by step 2)" in reason
    guarded = np.zeros(len(norms), dtype=bool)  # the same spike, clipped, leaves a healthy run: its typical norm counts
    guarded[2] = True
    value, reason = suggest_max_norm(norms, guarded=guarded)
    assert value == 0.4 and "broke down" not in reason


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


def test_parse_rule():
    assert parse_rule("ZClip(alpha=0.97, max_norm=None, include=[], nonfinite='skip', eps=inf)") == (
        "ZClip", {"alpha": 0.97, "max_norm": None, "nonfinite": "skip"})  # fmt: skip
    assert parse_rule("ClipByValue") == ("ClipByValue", {})  # older logs: the class alone
    assert parse_rule("Odd(") == ("Odd", {})


# --- advice per rule ------------------------------------------------------------------------------


def _report_of(tmp_path, cb, steps: int = 12, name: str = "run"):
    logger = TensorBoardLogger(tmp_path, name=name, version="")
    torch.manual_seed(0)  # the model's initial weights: the same run, and the same counts, every time
    make_trainer(tmp_path, [cb], logger=logger, max_steps=steps).fit(TinyModel(), make_loader(n=64))
    (s,) = summarize(logger.log_dir)
    return s


def test_every_clipping_callback_has_advice():
    import gradclip_plugin
    from gradclip_plugin.callbacks.base import GradientClipCallback

    rules = [n for n in gradclip_plugin.__all__ if n != "GradientClipCallback"
             and issubclass(getattr(gradclip_plugin, n), GradientClipCallback)]  # fmt: skip
    assert rules and set(rules) == set(ADVICE)


def test_clip_by_value_gets_a_clip_value_from_its_largest_entries(tmp_path):
    from gradclip_plugin import ClipByValue

    probe = GradProbe()
    logger = TensorBoardLogger(tmp_path, name="value", version="")
    make_trainer(tmp_path, [probe, ClipByValue(1e3)], logger=logger, max_steps=12).fit(TinyModel(), make_loader(n=64))
    (s,) = summarize(logger.log_dir)
    assert s.rule == "ClipByValue" and s.parameter == "clip_value" and s.args["clip_value"] == 1e3
    largest = np.array([max(g.abs().max().item() for g in step.values()) for step in probe.steps])
    np.testing.assert_allclose(s.norm, largest, rtol=1e-6)  # the logged norm is the largest |entry|
    assert s.suggestion == _round_down(float(np.sort(largest)[-2]))  # 12 logged steps: all of them count
    assert "largest |gradient entry|" in s.reason and "max_norm" not in s.reason
    assert "suggested clip_value" in format_summary(s) and "suggested max_norm" not in format_summary(s)


@pytest.mark.parametrize(
    "make_cb, parameter, words",
    [
        (lambda: __import__("gradclip_plugin").ClipByNorm(5.0), "max_norm", "each tensor's norm"),
        (lambda: __import__("gradclip_plugin").AdaptiveGradientClipping(), "clip_factor", "AGC has no max_norm"),
        (lambda: __import__("gradclip_plugin").AutoClip(), "percentile", "no max_norm to choose"),
        (lambda: __import__("gradclip_plugin").ZClip(warmup_steps=3, max_norm=None), "z_thresh", "moving mean and spread"),
    ],
    ids=["ClipByNorm", "AGC", "AutoClip", "ZClip"],
)
def test_other_rules_get_a_word_on_their_own_parameters_and_no_max_norm(tmp_path, make_cb, parameter, words):
    s = _report_of(tmp_path, make_cb())
    assert s.rule == type(make_cb()).__name__
    assert (s.parameter, s.suggestion) == (parameter, None) and words in s.reason
    assert f"suggested {parameter} -" in format_summary(s)


def test_zclip_cut_to_its_max_norm_cap_is_told_so(tmp_path):
    from gradclip_plugin import ZClip

    s = _report_of(tmp_path, ZClip(warmup_steps=3))  # max_norm=1.0, under every norm of TinyModel (about 40)
    assert (s.parameter, s.suggestion) == ("max_norm", None)
    assert s.reason.startswith("every logged step was cut to the max_norm cap 1, not by the rule's own threshold")
    # cut: steps 0, 4, 8 (threshold 1.5, its own) and 2, 5, 7, 10 (at the cap 2): most at the cap
    rows = [(i, clip_row(n, 2.0 if i % 4 else 1.5)) for i, n in enumerate(NORMS)]
    (s,) = summarize(write_events(tmp_path / "most", rows, rule="ZClip(z_thresh=2.5, max_norm=2.0)"))
    assert s.reason.startswith("4 of the 7 clipped logged steps were cut to the max_norm cap 2, not by")
    rows = [(i, clip_row(n, 2.0 if i % 2 else 1.5)) for i, n in enumerate(NORMS)]  # 6 of the 8 cut below the cap
    (s,) = summarize(write_events(tmp_path / "few", rows, rule="ZClip(z_thresh=2.5, max_norm=2.0)"))
    assert (s.parameter, s.suggestion) == ("z_thresh", None) and "cap" not in s.reason


def test_a_short_finite_run_that_clipped_every_step_gets_the_spikes_threshold(tmp_path):
    s = _report_of(tmp_path, ClipByGlobalNorm(1.0), steps=3)
    assert s.clip_rate == 1.0 and s.nonfinite == 0
    assert s.suggestion == _round_down(float(np.sort(s.norm)[-2])) and "max_norm=1 clipped 100% of them" in s.reason


def test_percentiles_say_how_many_finite_values_they_come_from():
    s = summarize_series(np.array([1.0, 2.0, math.nan, math.inf]))
    assert "(of 2 finite logged values)" in format_summary(s)


def summarize_series(norms: np.ndarray):
    from gradclip_plugin.report import NormSummary

    s = NormSummary(Path("."), "grad_norm", "monitor", np.arange(len(norms)), norms)
    finite = norms[np.isfinite(norms)]
    s.stats = {"p50": float(np.percentile(finite, 50))}
    return s


def test_skipped_steps_csv_is_listed(clipped_run, capsys):
    run, _ = clipped_run
    rows = "global_step,batch_idx,loss,norm\n" + "".join(f"{s},{s % 16},2.5,{1e4 + s}\n" for s in range(12))
    (run / "skipped_steps.csv").write_text(rows)
    try:
        assert main(["report", str(run), "-o", str(run / "csv.png")]) == 0
    finally:
        (run / "skipped_steps.csv").unlink()
    out = capsys.readouterr().out.splitlines()
    at = out.index("  skipped_steps.csv: 12 step(s)")
    assert out[at + 1] == "    global_step 0  batch_idx 0  loss 2.5  norm 10000.0"
    assert out[at + 11] == "    ... and 2 more"


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


def test_a_skip_spikes_run_lists_marks_and_titles_its_skipped_steps(tmp_path, capsys):
    from callbacks.test_spikes import SIGMA, WINDOW, SpikyModel, batches

    from gradclip_plugin import SkipSpikes
    from gradclip_plugin.report import figure

    cb, logger = SkipSpikes(window=WINDOW, sigma=SIGMA), TensorBoardLogger(tmp_path, name="spikes", version="")
    make_trainer(tmp_path, [cb], logger=logger, max_steps=STEPS, log_every_n_steps=5).fit(SpikyModel(), batches())
    skipped = [s for s in cb.skipped if math.isfinite(s.norm)]  # the NaN step is shaded, not marked
    assert len(skipped) >= 2
    assert main(["report", logger.log_dir]) == 0
    assert f"  skipped_steps.csv: {len(cb.skipped)} step(s)" in capsys.readouterr().out.splitlines()
    (s,) = summarize(Path(logger.log_dir))
    (ax,) = figure([s], "run").axes
    assert ax.get_title(loc="left") == f"grad_clip (SkipSpikes): skipped {len(cb.skipped) - 1} steps"  # the NaN step is a non-finite one
    (marks,) = [line for line in ax.get_lines() if "skipped_steps.csv" in line.get_label()]
    assert list(marks.get_xdata()) == [s.global_step for s in skipped]
    np.testing.assert_allclose(marks.get_ydata(), [s.norm for s in skipped])
