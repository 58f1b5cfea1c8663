"""``gradclip report LOGDIR``: summarise the gradient norms of a run from its TensorBoard event files.

For every run under ``LOGDIR`` (a directory of ``events.out.tfevents.*`` files) and every clipping
callback in it, prints the steps, the pre-clip norm's p50/p90/p99/max, the clip rate, the non-finite
and skipped steps, and advice for the rule the callback recorded: a ``max_norm`` (``clip_value``)
with the share of the steps it would have clipped, or a word on the rule's own parameters; lists
``skipped_steps.csv``; plots the norms and the threshold over steps. A run with a monitor and no
clipping callback is summarised from ``<prefix>/total``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from gradclip_plugin import names as N

__all__ = ["NormSummary", "advise", "figure", "find_runs", "load_scalars", "main", "plot", "suggest_max_norm", "summarize"]

PathLike = Union[str, Path]
Series = tuple[np.ndarray, np.ndarray]  # (steps, values)

PERCENTILES = (50, 90, 99)
SERIES = {"clip": (N.NORM, N.NORM_MAX, N.NORM_CLIPPED, N.THRESHOLD, N.SKIPPED_STEPS, N.CLIP_RATE),  # read by step: the norm,
          "monitor": (N.TOTAL, N.TOTAL_MAX)}  # its largest since the previous log, then the rest
EXPLOSION = 100.0  #: a norm this many times the median of those before it, unclipped, breaks a run down
TARGET = 95  #: the suggested threshold is this percentile of the pre-clip norms: it clips the top 5%
KEEP = (0.15, 2.0)  #: a threshold that clipped at most 15% of the steps, at most twice the suggestion, is kept
_NONFINITE = "Clipping cannot repair inf/NaN gradients: look for their source (learning rate, loss, data, loss scale)."


@dataclass
class NormSummary:
    """What ``gradclip report`` says about one norm series of one run; its arrays are by logged step."""

    run: Path
    prefix: str  #: the metric prefix, e.g. ``grad_clip`` or ``grad_clip/opt0`` (``grad_norm`` for a monitor)
    kind: str  #: ``"clip"`` (a clipping callback's pre-clip norm) or ``"monitor"`` (a monitor's total)
    steps: np.ndarray  #: the steps at which any series of ``prefix`` was written
    norm: np.ndarray  #: the norm at those steps (pre-clip for ``"clip"``); NaN where none was written
    rule: Optional[str] = None  #: the clipping callback's class, as it recorded it (``None`` if unknown)
    args: dict[str, Any] = field(default_factory=dict)  #: the arguments it recorded (those that are constants)
    norm_clipped: Optional[np.ndarray] = None  #: NaN where none was written (a skipped or non-finite step)
    thresholds: Optional[np.ndarray] = None  #: NaN where none was written
    threshold: Optional[float] = None  #: the last threshold written
    peaks: Optional[np.ndarray] = None  #: the largest norm since the previous log (``norm_max``, else ``norm``)
    guarded: Optional[np.ndarray] = None  #: whether that largest norm was clipped or skipped
    clip_rate: Optional[float] = None  #: fraction of (finite) optimizer steps clipped
    nonfinite: int = 0  #: optimizer steps with a non-finite norm, as the callback counted them
    skipped: Optional[int] = None  #: steps the rule skipped (``skip_above``, ZClip), where it logs them
    stats: dict[str, float] = field(default_factory=dict)  #: p50, p90, p99 of the finite norms, max of the peaks
    parameter: str = "max_norm"  #: the argument ``suggestion`` is a value for
    suggestion: Optional[float] = None
    reason: str = ""


def find_runs(logdir: PathLike) -> list[Path]:
    """The directories under ``logdir`` (itself included) that hold TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"`LOGDIR` {str(root)!r} does not exist")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def _events(run: PathLike, kind: str):
    """The event files of ``run`` (not its subdirectories), every event of ``kind`` kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={kind: 0})
    acc.Reload()
    return acc


def load_scalars(run: PathLike) -> dict[str, Series]:
    """Every scalar of ``run``: ``{tag: (steps, values)}``; a step written twice keeps its last value."""
    acc, out = _events(run, "scalars"), {}
    for tag in acc.Tags()["scalars"]:
        last = dict(sorted({e.step: e.value for e in acc.Scalars(tag)}.items()))
        out[tag] = (np.array(list(last), dtype=np.int64), np.array(list(last.values()), dtype=np.float64))
    return out


def load_rules(run: PathLike) -> dict[str, str]:
    """What each callback of ``run`` recorded of itself: ``{metric prefix: "ClipByGlobalNorm(max_norm=1.0, ...)"}``."""
    acc, suffix = _events(run, "tensors"), f"/{N.RULE}/text_summary"
    tags = [t for t in acc.Tags().get("tensors", []) if t.endswith(suffix)]
    return {t[: -len(suffix)]: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in tags}


def parse_rule(text: str) -> tuple[str, dict[str, Any]]:
    """A rule's class and its arguments that are constants, from what it recorded: ``"ZClip(max_norm=1.0, ...)"``
    gives ``("ZClip", {"max_norm": 1.0, ...})``; a bare class name (older logs) gives no arguments."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return text.split("(")[0], {}
    args = {k.arg: k.value.value for k in getattr(node, "keywords", []) if isinstance(k.value, ast.Constant)}
    return getattr(getattr(node, "func", node), "id", text.split("(")[0]), args


def breakdown(norms: np.ndarray, peaks: Optional[np.ndarray] = None, guarded: Optional[np.ndarray] = None,
              steps: Optional[np.ndarray] = None) -> tuple[int, str]:  # fmt: skip
    """Where a run broke down: ``(logged index, what)``, ``(len(norms), "")`` if it did not. At the first logged
    step (of ``steps``) whose largest norm (``peaks``), neither clipped nor skipped (``guarded``), is over
    ``EXPLOSION`` times the median norm before it (that update wrecks the weights), or where the norm stops
    being finite for good (inf/NaN weights); not at a non-finite step that finite ones follow (a skip)."""
    peaks, steps = norms if peaks is None else peaks, np.arange(len(norms)) if steps is None else steps
    finite = np.isfinite(norms)
    end = len(norms) - int(np.argmax(finite[::-1])) if finite.any() else 0  # after the last finite norm
    lowest = np.concatenate([norms[:1], np.fmin.accumulate(norms)[:-1]])  # under the median before: a cheap filter
    for i in np.flatnonzero(peaks[:end] > EXPLOSION * lowest[:end]):
        before = norms[: max(i, 1)]  # the first interval's largest norm is compared with its last
        if peaks[i] > EXPLOSION * np.median(before[np.isfinite(before)]) and (guarded is None or not guarded[i]):
            return int(i), f"a norm of {peaks[i]:.3g}, neither clipped nor skipped, by step {steps[i]}"
    return end, f"non-finite norms from step {steps[end]} on" if end < len(norms) else ""


def suggest_max_norm(norms: np.ndarray, threshold: Optional[float] = None, *, peaks: Optional[np.ndarray] = None,
                     guarded: Optional[np.ndarray] = None, steps: Optional[np.ndarray] = None,
                     parameter: str = "max_norm", quantity: str = "pre-clip norm") -> tuple[Optional[float], str]:  # fmt: skip
    """A threshold (``max_norm`` of ``ClipByGlobalNorm``) from the pre-clip ``norms`` at the logged steps, and why.

    The ``TARGET`` (95th) percentile of the finite norms of the second half of the logged steps before any
    :func:`breakdown` (all of them under 20), rounded down to two significant figures: it clips the spikes,
    about 5% of the steps; the reason says how many. The run's ``threshold`` is kept if it clipped at most
    15% of them and is at most twice that value (``KEEP``) in a run that did not break down; a run that broke
    down within five logged steps gets the smallest norm it showed. ``peaks``, ``guarded``, ``steps``: as
    in :func:`breakdown`; ``parameter``, ``quantity``: the argument, and what ``norms`` measure."""
    if not np.isfinite(norms).any():
        return None, "no finite norm was logged: the gradients were inf/NaN from the start. " + _NONFINITE
    stop, what = breakdown(norms, peaks, guarded, steps)
    stable = np.flatnonzero(np.isfinite(norms[:stop]))  # the finite norms before it: one at least
    after = f" before the run broke down ({what})" if what else ""
    if what and stable.size < 5:
        return _too_few(norms[stable], after, quantity)
    window = norms[stable[stable.size // 2 if stable.size >= 20 else 0 :]]
    top = float(np.nanmax((norms if peaks is None else peaks)[stable[-window.size] : stop]))
    where = ("the last " if window.size < stable.size else "") + f"{window.size} logged steps{after}"
    value = _round_down(float(np.sort(window)[int(TARGET / 100 * (window.size - 1))]))  # the norm at or below it
    old = math.nan if threshold is None else float(np.mean(window > threshold))
    if not what and old <= KEEP[0] and threshold <= KEEP[1] * value:
        return threshold, (f"keep {parameter}={threshold:g}: it clipped {old:.0%} of {where} (at most {KEEP[0]:.0%}) and is "
                           f"within {KEEP[1]:g}x of their {TARGET}th percentile, {value:g}.")  # fmt: skip
    reason = (f"{parameter} {value:g} would have clipped {np.mean(window > value):.0%} of {where}: the spikes, up to "
              f"{top:.3g}, above the {TARGET}th percentile of the {quantity}; the other steps pass unchanged.")  # fmt: skip
    if threshold is not None:
        reason += f" The run's {parameter}={threshold:g} clipped {old:.0%} of them" + (
            ": most updates were scaled down, as by a smaller learning rate (fine if it trained well)." if old > 0.5 else "."
        )
    reason += f" Only {window.size} logged steps: a rough figure." if window.size < 10 else ""
    return value, reason + (f" {_NONFINITE}" if what.startswith("non-finite") else "")


def _too_few(norms: np.ndarray, after: str, quantity: str) -> tuple[Optional[float], str]:
    """The suggestion from the few finite ``norms`` of a run that broke down soon (``after`` says where)."""
    if not norms.size:
        return None, f"no logged step came{after}: log every step (`log_every_n_steps=1`) and report again."
    value = _round_down(float(np.min(norms)))
    return value, (f"only {norms.size} logged step(s) came{after}: {value:g} is the smallest {quantity} they showed, a "
                   "cautious start (Pascanu et al. 2013: training behaves well even for rather small thresholds).")


class Advice(NamedTuple):
    """What ``gradclip report`` advises for one rule (``ADVICE``, keyed by the class name it records)."""

    parameter: str  #: the argument the advice is about
    quantity: str = "pre-clip norm"  #: what the rule logs as ``norm``
    note: str = ""  #: the advice for a rule that sets its threshold itself (then no value is suggested)
    skip: str = "skip_above"  #: the argument that makes the rule skip steps
    cap: str = ""  #: the argument that caps the rule's own threshold


ADVICE = {
    "ClipByGlobalNorm": Advice("max_norm"),
    "ClipByValue": Advice("clip_value", "largest |gradient entry|"),
    "ClipByNorm": Advice("max_norm", note="ClipByNorm bounds each tensor's norm; the logged norm is the total, which says "
        "nothing of a per-tensor bound. Log each tensor's (`group_depth='parameter'`) and choose from the largest."),
    "AdaptiveGradientClipping": Advice("clip_factor", note="AGC has no max_norm: each unit's gradient is limited to clip_factor "
        "times its weight's norm (0.01 at batch size 4096, larger for smaller batches): raise it if AGC clips every step."),
    "AutoClip": Advice("percentile", note="AutoClip sets its threshold itself, at a percentile of the norms seen so "
        "far: there is no max_norm to choose. A lower percentile clips harder; the paper's 10 works across its tasks."),
    "ZClip": Advice("z_thresh", skip="skip_step_z_thresh", cap="max_norm", note="ZClip sets its threshold itself from the "
        "moving mean and spread of the norm (see `spikes` and `z`), under its max_norm. A lower z_thresh clips more."),
    "AdaGC": Advice("lambda_rel", note="AdaGC sets each tensor's threshold itself: lambda_rel times a moving average of that "
        "tensor's clipped norms, after a warm-up clipped globally to lambda_abs: there is no max_norm to choose. Its clip "
        "rate counts a step where any tensor was clipped; `clipped_tensors` says how many were: raise lambda_rel (1.05 in "
        "the paper) if most are clipped at most steps, or lambda_abs if the warm-up clips every step."),
    "SkipSpikes": Advice("sigma", skip="sigma", note="SkipSpikes does not clip: it skips a step whose loss or norm is more "
        "than sigma standard deviations above its window's mean (skipped_steps.csv lists them). Place a clipping callback "
        "after it; raise sigma (6 in OLMo-core) if it skips more than a few steps in a thousand."),
}  # fmt: skip


def advise(s: NormSummary) -> tuple[str, Optional[float], str]:
    """``(parameter, value or None, reason)``: what ``gradclip report`` advises for ``s``'s rule (``ADVICE``)."""
    rule = ADVICE.get(s.rule or "", ADVICE["ClipByGlobalNorm"])
    total, p99 = int(s.steps[-1]) + 1, s.stats.get("p99", math.nan)
    named = f"{rule.skip}={s.args[rule.skip]:g}" if isinstance(s.args.get(rule.skip), float) else rule.skip
    skips = f" {named} skipped {s.skipped} of the {total} steps ({s.skipped / total:.0%})." if s.skipped else ""
    if s.skipped and s.skipped > total / 2:
        return rule.skip, None, (f"{named} is too low: the rule skipped {s.skipped} of the {total} steps, so the model hardly "
                                 f"trained. Raise it well above the {rule.quantity}s (p99 {p99:.3g}) or remove it.")  # fmt: skip
    capped = _capped(s, rule.cap) if rule.cap else ""
    if capped or rule.note:
        rate = "" if s.clip_rate is None else f" It clipped {s.clip_rate:.0%} of the steps."
        return (rule.cap, None, capped + skips) if capped else (rule.parameter, None, rule.note + rate + skips)
    value, reason = suggest_max_norm(s.norm, s.threshold, peaks=s.peaks, guarded=s.guarded, steps=s.steps,
                                     parameter=rule.parameter, quantity=rule.quantity)  # fmt: skip
    return rule.parameter, value, reason + skips


def _capped(s: NormSummary, cap: str) -> str:
    """What to say if most clipped logged steps were cut to the rule's ``cap`` argument, else ``""``."""
    if s.thresholds is None or s.norm_clipped is None:  # both written at one step at least, if at all
        return ""
    value, cut = s.args.get(cap), s.norm_clipped < s.norm * (1 - 1e-5)  # older logs name no cap: none is known
    n, finite = int(np.sum(cut & np.isclose(s.thresholds, value or math.nan, rtol=1e-6))), int(np.isfinite(s.norm).sum())
    if value is None or n <= cut.sum() / 2:
        return ""
    which = "every logged step was" if n == finite else f"{n} of the {int(cut.sum())} clipped logged steps were"
    return (f"{which} cut to the {cap} cap {value:g}, not by the rule's own threshold: raise or remove {cap} (the "
            f"pre-clip norm's p50 here is {s.stats.get('p50', math.nan):.3g}).")  # fmt: skip


def _round_down(x: float) -> float:
    """Round down to two significant figures (``0.0`` stays ``0.0``)."""
    if x <= 0 or not math.isfinite(x):
        return x
    # in decimal: `math.floor(0.29 / 0.01)` is 28, as 0.29 / 0.01 is 28.999999999999996 in binary
    exponent = math.floor(math.log10(x)) - 1
    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(exponent), rounding=ROUND_FLOOR))


def summarize(run: PathLike, scalars: Optional[dict[str, Series]] = None) -> list[NormSummary]:
    """One :class:`NormSummary` per clipping callback (and optimizer) of ``run``; a monitor's if none."""
    run, rules = Path(run), load_rules(run)
    scalars = load_scalars(run) if scalars is None else scalars
    prefixes = sorted(t[: -len(N.NONFINITE_STEPS) - 1] for t in scalars if t.endswith(f"/{N.NONFINITE_STEPS}"))
    kinds = {p: "monitor" if f"{p}/{N.TOTAL}" in scalars else "clip" for p in prefixes}  # every callback logs the count
    out = [_summary(scalars, run, p, k, rules) for p, k in kinds.items() if k == "clip"] or [
        _summary(scalars, run, p, k, rules) for p, k in kinds.items()]  # fmt: skip
    for s in out:
        finite = s.norm[np.isfinite(s.norm)]
        if finite.size:
            s.stats = {f"p{p}": float(np.percentile(finite, p)) for p in PERCENTILES} | {"max": float(np.nanmax(s.peaks))}
        s.parameter, s.suggestion, s.reason = advise(s)
    return out


def _summary(scalars: dict[str, Series], run: Path, prefix: str, kind: str, rules: dict[str, str]) -> NormSummary:
    """The series of ``prefix`` paired by step (NaN at a step a series was not written at), and its counts."""
    read = SERIES[kind]
    tags = {n: f"{prefix}/{n}" for n in (*read, N.NONFINITE_STEPS) if f"{prefix}/{n}" in scalars}
    steps = np.unique(np.concatenate([scalars[t][0] for t in tags.values()]))
    v = {n: np.full(len(steps), np.nan) for n in (N.NORM_CLIPPED, N.THRESHOLD, N.SKIPPED_STEPS, N.NONFINITE_STEPS, *read)}
    for n, t in tags.items():
        v[n][np.searchsorted(steps, scalars[t][0])] = scalars[t][1]
    owner = prefix.rsplit("/opt", 1)[0] if prefix.rsplit("/opt", 1)[-1].isdigit() else prefix
    rule = parse_rule(rules[owner]) if kind == "clip" and owner in rules else ()
    s = NormSummary(run, prefix, kind, steps, v[read[0]], *rule)
    s.norm_clipped, s.thresholds = (v[n] if n in tags else None for n in (N.NORM_CLIPPED, N.THRESHOLD))
    s.threshold = float(scalars[tags[N.THRESHOLD]][1][-1]) if N.THRESHOLD in tags else None
    s.peaks = np.fmax(s.norm, v[read[1]])  # where the step's largest norm is not logged, its last
    # a threshold not written (a skipped step) is the one before; a skip raises `skipped_steps`
    s.guarded = (s.peaks > _ffill(v[N.THRESHOLD])) | (np.diff(_ffill(v[N.SKIPPED_STEPS]), prepend=0) > 0)
    s.nonfinite = int(scalars[tags[N.NONFINITE_STEPS]][1][-1])  # a running count: its last value
    s.skipped = int(scalars[tags[N.SKIPPED_STEPS]][1][-1]) if N.SKIPPED_STEPS in tags else None
    s.clip_rate = _interval_weighted_mean(*scalars[tags[N.CLIP_RATE]]) if N.CLIP_RATE in tags else None
    return s


def _ffill(x: np.ndarray) -> np.ndarray:
    """``x`` with each NaN replaced by the last value before it (NaN before the first)."""
    return x[np.maximum.accumulate(np.where(np.isnan(x), 0, np.arange(len(x))))]


def _interval_weighted_mean(steps: np.ndarray, rates: np.ndarray) -> float:
    """Mean of logged ``clip_rate`` values, each weighted by the steps it covers (since the previous log)."""
    weights = np.diff(np.concatenate([[-1], steps])).astype(np.float64)
    ok = np.isfinite(rates)
    return float(np.sum(rates[ok] * weights[ok]) / np.sum(weights[ok])) if ok.any() else float("nan")


def figure(summaries: list[NormSummary], title: str = "") -> Any:
    """A matplotlib ``Figure`` with one chart per summary, on a log axis: the pre-clip norm (the largest since the
    previous log, ``norm_max``, and the logged step's), the threshold, what clipping cut off, the skipped and
    non-finite steps, and where the run broke down (:func:`breakdown`). Drawn off pyplot: no backend is changed."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"font.size": 9}):  # legible at the 350 pixels of TensorBoard's image card
        fig = Figure(figsize=(5, 4.2 * len(summaries)), layout="constrained")
        axes = fig.subplots(len(summaries), 1, squeeze=False)[:, 0]
        for ax, s in zip(axes, summaries):
            _draw(ax, s)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=9)
    return fig


def _draw(ax: Any, s: NormSummary) -> None:
    """``s``'s series on ``ax`` (see :func:`figure`)."""
    what = "pre-clip norm" if s.kind == "clip" else f"{s.prefix}/{N.TOTAL}"
    ax.plot(s.steps, s.peaks, color="tab:red", lw=0.8, marker="o", ms=1.5, label=f"{what} (largest\nsince the previous log)")
    if np.any(s.peaks > s.norm):
        ax.plot(s.steps, s.norm, ".", color="darkred", ms=2, label=f"{what}\n(at the logged step)")
    if s.thresholds is not None:
        ax.plot(s.steps, s.thresholds, color="black", lw=1.4, ls="--", label="threshold")
    if s.norm_clipped is not None:
        cut, skip = s.norm_clipped < s.norm * (1 - 1e-6), np.isfinite(s.norm) & np.isnan(s.norm_clipped)
        ax.vlines(s.steps[cut], s.norm_clipped[cut], s.norm[cut], color="tab:blue", lw=2, alpha=0.6, zorder=3,
                  label="clipped off" if cut.any() else None)  # fmt: skip
        ax.plot(s.steps[skip], s.norm[skip], "X", color="tab:purple", ms=8,
                label=f"skipped ({skip.sum()} logged steps)" if skip.any() else None)  # fmt: skip
    # SkipSpikes' record: its global steps are the panel's steps with one optimizer (with several, they count them all)
    if s.rule == "SkipSpikes" and "/opt" not in s.prefix and (rows := [r for r in _csv_rows(s.run) if math.isfinite(float(r["norm"]))]):
        ax.plot([int(r["global_step"]) for r in rows], [float(r["norm"]) for r in rows], "X", color="tab:purple", ms=8,
                label=f"skipped ({len(rows)} steps,\nskipped_steps.csv)")  # fmt: skip
    if s.suggestion is not None:
        ax.axhline(s.suggestion, color="tab:green", lw=1.4, ls=":", label=f"suggested {s.parameter} {s.suggestion:g}")
    bad = ~np.isfinite(s.norm)
    _shade(ax, s.steps, bad)
    stop, broke = breakdown(s.norm, s.peaks, s.guarded, s.steps)
    if broke:
        ax.axvline(s.steps[stop], color="tab:pink", lw=6, alpha=0.5, label=textwrap.fill(f"broke down: {broke}", 34))
    if np.all(s.norm[~bad] > 0) and not bad.all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("largest |gradient entry|" if s.rule == "ClipByValue" else "gradient norm")
    ax.set_title(_title(s), loc="left")
    ax.grid(True, which="both", alpha=0.25)


def _title(s: NormSummary) -> str:
    """A panel's title: the series, its rule where the name does not say it, and what the rule did."""
    rule = s.rule or ("monitor, nothing clipped" if s.kind == "monitor" else "clipping")
    did = [f"clipped {s.clip_rate:.0%} of the steps"] if s.clip_rate is not None else []
    did += [f"skipped {s.skipped} steps"] if s.skipped else []
    return (s.prefix if s.prefix.endswith(f"/{rule}") else f"{s.prefix} ({rule})") + (": " + ", ".join(did) if did else "")


def _shade(ax: Any, steps: np.ndarray, bad: np.ndarray) -> None:
    """One shaded span on ``ax`` per stretch of ``bad`` (non-finite) logged steps."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bad, [0]])))  # where each stretch of them starts, ends
    for k, (first, end) in enumerate(edges.reshape(-1, 2)):
        ax.axvspan(steps[first] - 0.5, steps[end - 1] + 0.5, color="tab:orange", alpha=0.3, lw=0,
                   label=None if k else f"non-finite norm\n({bad.sum()} logged steps)")  # fmt: skip


def plot(summaries: list[NormSummary], path: PathLike, title: str = "") -> Path:
    """Write :func:`figure` of ``summaries`` as a PNG at ``path``; return ``path``."""
    figure(summaries, title).savefig(path, dpi=220)
    return Path(path)


def format_summary(s: NormSummary) -> str:
    """The text block ``gradclip report`` prints for one summary."""
    finite = int(np.sum(np.isfinite(s.norm)))
    shown = "  ".join(f"{k} {v:.4g}" for k, v in s.stats.items())
    low, high = (float(f(s.thresholds)) for f in (np.nanmin, np.nanmax)) if s.threshold is not None else (0, 0)
    varied = f"{s.threshold:g} (last; {low:.4g} to {high:.4g})" if low < high else f"{high:g}"
    rows = {
        "steps": f"{int(s.steps[-1]) + 1 if len(s.steps) else 0} ({len(s.steps)} logged)",
        "pre-clip norm" if s.kind == "clip" else "norm (monitor)":
            f"{shown}  (of {finite} finite logged value{'s' * (finite != 1)})" if s.stats else "no finite value",
        "threshold": None if s.threshold is None else varied,
        "clip rate": None if s.clip_rate is None else f"{s.clip_rate:.1%}",
        "non-finite steps": f"{s.nonfinite}",
        "skipped steps": None if s.skipped is None else f"{s.skipped} (by the rule)",
        "rule": s.rule,
    }  # fmt: skip
    lines = [f"  {s.prefix}"] + [f"    {k:<18}{v}" for k, v in rows.items() if v is not None]
    lines.append(f"    suggested {s.parameter} {'-' if s.suggestion is None else f'{s.suggestion:g}'}")
    lines.extend(textwrap.wrap(s.reason, width=100, initial_indent="      why: ", subsequent_indent="      "))
    return "\n".join(lines)


def report(logdir: PathLike, output: Optional[PathLike] = None, out=None) -> list[NormSummary]:
    """Print the summary of every run under ``logdir`` and write one PNG per run; return the summaries."""
    out, runs, everything = sys.stdout if out is None else out, find_runs(logdir), []
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under `LOGDIR` {str(logdir)!r}")
    if output is not None and len(runs) > 1:
        raise ValueError(f"`--output` names one PNG, but `LOGDIR` {str(logdir)!r} holds {len(runs)} runs: pass one run")
    for run in runs:
        summaries = summarize(run)
        print("\n".join([f"run {run}", *_skipped_rows(run), *map(format_summary, summaries)]), file=out)
        if not summaries:
            print("  no gradient norms logged (add a clipping callback or a GradientNormMonitor)\n", file=out)
            continue
        try:
            png = plot(summaries, output or run / "gradclip_report.png", title=str(run))
            print(f"  plot: {png}\n", file=out)
        except ImportError:
            print("  plot: skipped, matplotlib is not installed (pip install 'gradclip_plugin[report]')\n", file=out)
        everything.extend(summaries)
    return everything


def _csv_rows(run: Path, name: str = "skipped_steps.csv") -> list[dict[str, str]]:
    """The rows of ``run/<name>`` (SkipSpikes' record), none without one."""
    path = run / name
    return list(csv.DictReader(path.read_text().splitlines())) if path.is_file() else []


def _skipped_rows(run: Path, shown: int = 10) -> list[str]:
    """Lines listing the steps of each ``run/skipped_steps*.csv`` (one per SkipSpikes)."""
    out = []
    for path in sorted(run.glob("skipped_steps*.csv")):
        rows = _csv_rows(run, path.name)
        lines = ["    " + "  ".join(f"{k} {v}" for k, v in r.items()) for r in rows[:shown]]  # global_step, batch_idx, ...
        out += [f"  {path.name}: {len(rows)} step(s)", *lines, *[f"    ... and {len(rows) - shown} more"] * (len(rows) > shown)]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """The ``gradclip`` console script."""
    parser = argparse.ArgumentParser(prog="gradclip", description="gradclip_plugin tools")
    rep = parser.add_subparsers(dest="command", required=True).add_parser(
        "report", help="summarise gradient norms from TensorBoard logs and advise on the clipping threshold",
        description=__doc__.split("\n\n")[1])  # fmt: skip
    rep.add_argument("logdir", metavar="LOGDIR", help="a run's log directory, or a directory of runs")
    rep.add_argument("-o", "--output", help="PNG path (one run only); default: <run>/gradclip_report.png")
    args = parser.parse_args(argv)
    try:
        report(args.logdir, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"gradclip report: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gradclip report ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
