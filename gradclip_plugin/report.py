"""``gradclip report LOGDIR``: summarise the gradient norms of a run from its TensorBoard event files.

For every run under ``LOGDIR`` (a directory holding ``events.out.tfevents.*`` files) and every
clipping callback in it (``<prefix>/norm``, ``norm_clipped``, ``threshold``), prints the number of
steps, the pre-clip norm's p50/p90/p99/max, the clip rate, the non-finite steps, and advice for that
callback's rule (which each clipping callback records in the logs): a value for the argument that
sets its threshold (``max_norm`` of ``ClipByGlobalNorm``, ``clip_value`` of ``ClipByValue``), or a
word on the rule's own parameters; and writes a PNG of the pre-clip norm, the post-clip norm and
the threshold over steps. A run with a :class:`GradientNormMonitor` and no clipping callback is
summarised from ``<prefix>/total`` (advice for ``ClipByGlobalNorm``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from decimal import ROUND_FLOOR, Decimal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["NormSummary", "advise", "find_runs", "load_scalars", "main", "plot", "suggest_max_norm", "summarize"]

PathLike = Union[str, Path]
Series = tuple[np.ndarray, np.ndarray]  # (steps, values)

PERCENTILES = (50, 90, 99)
#: a norm this many times the median of those before it, unclipped, breaks a run down
EXPLOSION = 100.0


@dataclass
class NormSummary:
    """What ``gradclip report`` says about one norm series of one run."""

    run: Path
    prefix: str  #: the metric prefix, e.g. ``grad_clip`` or ``grad_clip/opt0`` (``grad_norm`` for a monitor)
    kind: str  #: ``"clip"`` (a clipping callback's pre-clip norm) or ``"monitor"`` (a monitor's total)
    steps: np.ndarray  #: the logged steps
    norm: np.ndarray  #: the norm at those steps (pre-clip for ``"clip"``)
    rule: Optional[str] = None  #: the clipping callback's class, as it recorded it (``None`` if unknown)
    norm_clipped: Optional[np.ndarray] = None
    thresholds: Optional[np.ndarray] = None
    clip_rate: Optional[float] = None  #: fraction of (finite) optimizer steps clipped
    nonfinite: int = 0  #: optimizer steps with a non-finite norm
    nonfinite_scope: str = "logged steps"  #: ``"all steps"`` when a clipping callback counted them
    skipped: Optional[int] = None  #: steps the rule skipped (``skip_above``, ZClip), where it logs them
    stats: dict[str, float] = field(default_factory=dict)  #: p50, p90, p99, max of the finite norms
    parameter: str = "max_norm"  #: the argument ``suggestion`` is a value for
    suggestion: Optional[float] = None
    reason: str = ""

    @property
    def threshold(self) -> Optional[float]:
        """The last threshold in force, or ``None`` without a clipping callback."""
        return None if self.thresholds is None or not len(self.thresholds) else float(self.thresholds[-1])


def find_runs(logdir: PathLike) -> list[Path]:
    """The directories under ``logdir`` (itself included) that hold TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"`LOGDIR` {str(root)!r} does not exist")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def load_scalars(run: PathLike) -> dict[str, Series]:
    """Every scalar of the event files in ``run`` (not its subdirectories): ``{tag: (steps, values)}``.

    A step logged twice (a resumed run) keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags()["scalars"]:
        last = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(last), dtype=np.int64)
        out[tag] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    return out


def load_rules(run: PathLike) -> dict[str, str]:
    """The rule of each clipping callback of ``run``, as it recorded it: ``{metric prefix: class name}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    suffix = "/callback/text_summary"
    return {
        tag[: -len(suffix)]: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in acc.Tags().get("tensors", [])
        if tag.endswith(suffix)
    }


def suggest_max_norm(
    norms: np.ndarray,
    threshold: Optional[float] = None,
    clip_rate: Optional[float] = None,
    parameter: str = "max_norm",
    quantity: str = "pre-clip norm",
    clipped: Optional[np.ndarray] = None,
) -> tuple[Optional[float], str]:
    """A threshold (``max_norm`` of ``ClipByGlobalNorm``) from the pre-clip norms of a run, and why.

    The rule is Pascanu et al.'s (2013): set the threshold from the typical norm over many updates;
    here the median of the finite norms of the second half of the logged steps before any non-finite
    one (the first steps of a run are often far larger and do not represent the rest; after a
    non-finite norm the weights are usually ruined). They add that training "behaves well even for
    rather small thresholds", so the value is rounded down to two significant figures. Under ten
    logged steps all of them count. A run that already clipped most of its steps and stayed finite
    keeps its threshold: its norms were measured on a trajectory that the clipping itself kept
    stable, and say little about a looser threshold. A run breaks down at its first non-finite norm,
    or at its first unclipped norm over 100 times the median of those before it (an update that size
    wrecks the weights, and the norms after it are a broken model's); only the steps before count,
    and a run that broke down within five logged steps gets the smallest norm it showed before.

    Args:
        norms: pre-clip norms at the logged steps, in step order.
        threshold: the threshold in force at the end of the run, if it clipped.
        clip_rate: the fraction of steps it clipped.
        parameter: the argument the value is for (``"clip_value"`` for ``ClipByValue``).
        quantity: what ``norms`` measure (``"largest |gradient entry|"`` for ``ClipByValue``).
        clipped: whether clipping changed each logged step (``None``: none was clipped).

    Returns:
        ``(value or None, reason)``.
    """
    finite = norms[np.isfinite(norms)]
    if finite.size == 0:
        return None, (
            "no finite norm was logged: the gradients were inf/NaN from the start. Clipping cannot repair that; "
            "look for the source (learning rate, loss, data, loss scale)."
        )
    bad = np.flatnonzero(~np.isfinite(norms))
    for i in range(1, bad[0] if bad.size else len(norms)):  # an unclipped explosion ends the run as NaN does
        if norms[i] > EXPLOSION * np.median(norms[:i]) and (clipped is None or not clipped[i]):
            bad = np.array([i])
            break
    stable = norms[: bad[0]] if bad.size else norms
    if threshold is not None and clip_rate is not None and clip_rate > 0.5 and not bad.size:
        return threshold, (
            f"keep {parameter}={threshold:g}: it clipped {clip_rate:.0%} of the steps and every step stayed finite. "
            f"Clipping that often bounds every update, which is what kept this run stable; the {quantity} it "
            f"measured ({_round_down(float(np.median(stable))):g} at the median) was measured under it and does not "
            f"show that a looser threshold would be safe. If training is slow, raise {parameter} a step at a time "
            "and report again."
        )
    breakdown = ""
    if bad.size:
        what = "a non-finite norm" if not np.isfinite(norms[bad[0]]) else f"a norm of {norms[bad[0]]:.3g}, unclipped"
        breakdown = f" before the run broke down ({what}, at logged step {bad[0]})"
    if bad.size and stable.size < 5:
        value = _round_down(float(np.min(stable if stable.size else finite)))
        return value, (
            f"only {stable.size} logged step(s) came{breakdown}, too few to measure a typical {quantity}; "
            f"{value:g} is the smallest one they showed, a cautious start (Pascanu et al. 2013: training behaves "
            "well even for rather small thresholds). Clip with it, then report on that run."
        )
    recent = stable[len(stable) // 2 :] if stable.size >= 10 else stable
    median = _round_down(float(np.median(recent)))
    window = ("the last " if recent.size < stable.size else "") + f"{recent.size} logged steps"
    window += breakdown
    reason = (
        f"the median {quantity} over {window} (Pascanu et al. 2013: set the threshold from the typical norm "
        f"over many updates): steps of ordinary size pass nearly unchanged and the spikes, up to "
        f"{float(np.max(finite)):.3g}, are scaled down."
    )
    if recent.size < 10:
        reason += f" Only {recent.size} logged steps: a rough figure; report on a longer run to refine it."
    if threshold is not None and clip_rate is not None:
        reason += f" The run's {parameter}={threshold:g} clipped {clip_rate:.0%} of the steps"
        reason += ", so it hardly ever acted." if clip_rate < 0.05 else "."
    return median, reason


def advise(s: NormSummary) -> tuple[str, Optional[float], str]:
    """``(parameter, value or None, reason)``: what ``gradclip report`` advises for ``s``'s rule."""
    rate = "" if s.clip_rate is None else f" It clipped {s.clip_rate:.0%} of the steps."
    if s.rule == "ClipByValue":
        clipped = s.norm_clipped < s.norm
        return "clip_value", *suggest_max_norm(s.norm, s.threshold, s.clip_rate, "clip_value", "largest |gradient entry|", clipped)
    if s.rule == "ClipByNorm":
        return "max_norm", None, (
            "ClipByNorm bounds each tensor's norm, and the logged norm is the total over all of them: it says "
            "nothing about a per-tensor bound. Log each tensor's norm (`group_depth='parameter'`) and choose "
            f"max_norm from the largest of them.{rate}"
        )
    if s.rule == "AdaptiveGradientClipping":
        return "clip_factor", None, (
            "AGC has no max_norm: each unit of a gradient is limited to clip_factor times its weight's norm, so its "
            f"threshold follows the weights.{rate} The paper uses clip_factor=0.01 at batch size 4096 and larger "
            "values for smaller batches: raise it if AGC clips nearly every step and training is slow."
        )
    if s.rule == "AutoClip":
        return "percentile", None, (
            "AutoClip sets its threshold itself, at a percentile of the norms seen so far: there is no max_norm "
            f"to choose.{rate} A lower percentile clips harder; the paper's 10 works across its tasks."
        )
    if s.rule == "ZClip":
        return "z_thresh", None, (
            "ZClip sets its threshold itself from the moving mean and spread of the norm, clipping the spikes "
            f"(see `spikes` and `z`), never above its own max_norm.{rate} A lower z_thresh clips more of them."
        )
    clipped = None if s.norm_clipped is None else s.norm_clipped < s.norm
    return "max_norm", *suggest_max_norm(s.norm, s.threshold, s.clip_rate, clipped=clipped)


def _round_down(x: float) -> float:
    """Round down to two significant figures (``0.0`` stays ``0.0``)."""
    if x <= 0 or not math.isfinite(x):
        return x
    # in decimal: `math.floor(0.29 / 0.01)` is 28, as 0.29 / 0.01 is 28.999999999999996 in binary
    exponent = math.floor(math.log10(x)) - 1
    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(exponent), rounding=ROUND_FLOOR))


def summarize(run: PathLike, scalars: Optional[dict[str, Series]] = None) -> list[NormSummary]:
    """One :class:`NormSummary` per clipping callback (and optimizer) of ``run``; a monitor's if none."""
    run = Path(run)
    scalars = load_scalars(run) if scalars is None else scalars
    rules = load_rules(run)
    out: list[NormSummary] = []
    for prefix in sorted(t[: -len("/norm")] for t in scalars if t.endswith("/norm") and f"{t}_clipped" in scalars):
        steps, norm = scalars[f"{prefix}/norm"]
        owner = prefix.rsplit("/opt", 1)[0] if prefix.rsplit("/opt", 1)[-1].isdigit() else prefix
        s = NormSummary(run, prefix, "clip", steps, norm, rule=rules.get(owner))
        s.norm_clipped = scalars[f"{prefix}/norm_clipped"][1]
        if f"{prefix}/threshold" in scalars:
            s.thresholds = scalars[f"{prefix}/threshold"][1]
        if f"{prefix}/clip_rate" in scalars:
            s.clip_rate = _interval_weighted_mean(*scalars[f"{prefix}/clip_rate"])
        if f"{prefix}/nonfinite_steps" in scalars:  # a running count over all steps
            s.nonfinite, s.nonfinite_scope = int(scalars[f"{prefix}/nonfinite_steps"][1][-1]), "all steps"
        else:
            s.nonfinite = int(np.sum(~np.isfinite(norm)))
        if f"{prefix}/skipped_steps" in scalars:  # a running count over all steps
            s.skipped = int(scalars[f"{prefix}/skipped_steps"][1][-1])
        out.append(s)
    if not out:
        for tag in sorted(t for t in scalars if t.endswith("/total")):
            steps, norm = scalars[tag]
            out.append(NormSummary(run, tag[: -len("/total")], "monitor", steps, norm, nonfinite=int(np.sum(~np.isfinite(norm)))))
    for s in out:
        finite = s.norm[np.isfinite(s.norm)]
        if finite.size:
            s.stats = {f"p{p}": float(np.percentile(finite, p)) for p in PERCENTILES}
            s.stats["max"] = float(np.max(finite))
        s.parameter, s.suggestion, s.reason = advise(s)
    return out


def _interval_weighted_mean(steps: np.ndarray, rates: np.ndarray) -> float:
    """Mean of logged ``clip_rate`` values, each weighted by the steps it covers (since the previous log)."""
    weights = np.diff(np.concatenate([[-1], steps])).astype(np.float64)
    ok = np.isfinite(rates)
    return float(np.sum(rates[ok] * weights[ok]) / np.sum(weights[ok])) if ok.any() else float("nan")


def plot(summaries: list[NormSummary], path: PathLike, title: str = "") -> Path:
    """Write a PNG of each summary's norm, norm_clipped and threshold over steps (log scale).

    The legend sits beside the axes, off the data. The post-clip norm is a wide pale band under the
    other lines: where it hides under the threshold the step was clipped, where it hides under the
    pre-clip norm the step was not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 1, figsize=(12, 4.2 * len(summaries)), squeeze=False, sharex=True)
    for ax, s in zip(axes[:, 0], summaries):
        if s.norm_clipped is not None:
            ax.plot(s.steps, s.norm_clipped, color="tab:blue", lw=5, alpha=0.35, solid_capstyle="butt",
                    label="post-clip norm\n(under the threshold\nwhere clipped)")  # fmt: skip
        label = "pre-clip norm" if s.kind == "clip" else f"{s.prefix}/total"
        ax.plot(s.steps, s.norm, color="tab:red", lw=1.2, marker="o", ms=2.5, label=label)
        if s.thresholds is not None:
            ax.plot(s.steps, s.thresholds, color="black", lw=1.4, ls="--", label="threshold")
        if s.suggestion is not None:
            ax.axhline(s.suggestion, color="tab:green", lw=1.4, ls=":", label=f"suggested {s.parameter} {s.suggestion:g}")
        bad = np.flatnonzero(~np.isfinite(s.norm))
        for first, last in _runs(bad):  # one shaded span per stretch of consecutive non-finite logged steps
            ax.axvspan(s.steps[first] - 0.5, s.steps[last] + 0.5, color="tab:orange", alpha=0.3, lw=0)
        if bad.size:
            ax.fill_between([], [], color="tab:orange", alpha=0.3, label=f"non-finite norm\n({bad.size} logged steps)")
        finite = s.norm[np.isfinite(s.norm)]
        if finite.size and np.all(finite > 0):
            ax.set_yscale("log")
        ax.set_ylabel("largest |gradient entry|" if s.rule == "ClipByValue" else "gradient norm")
        ax.set_title(s.prefix + (f" ({s.rule})" if s.rule else ""), loc="left", fontsize=11)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive stretches of sorted ``indices`` as ``(first, last)`` pairs: [2, 3, 4, 7] -> [(2, 4), (7, 7)]."""
    if not indices.size:
        return []
    breaks = np.flatnonzero(np.diff(indices) > 1)
    starts = np.concatenate([[indices[0]], indices[breaks + 1]])
    ends = np.concatenate([indices[breaks], [indices[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def format_summary(s: NormSummary) -> str:
    """The text block ``gradclip report`` prints for one summary."""
    what = "pre-clip norm" if s.kind == "clip" else "norm (monitor)"
    last = int(s.steps[-1]) + 1 if len(s.steps) else 0
    lines = [f"  {s.prefix}", f"    steps             {last} ({len(s.steps)} logged)"]
    if s.stats:
        finite = int(np.sum(np.isfinite(s.norm)))
        shown = "  ".join(f"{k} {v:.4g}" for k, v in s.stats.items())
        lines.append(f"    {what:<18}{shown}  (of {finite} finite logged value{'s' * (finite != 1)})")
    else:
        lines.append(f"    {what:<18}no finite value")
    if s.threshold is not None:
        low, high = float(np.nanmin(s.thresholds)), float(np.nanmax(s.thresholds))
        shown = f"{high:g}" if low == high else f"{s.threshold:g} (last; {low:.4g} to {high:.4g})"
        lines.append(f"    threshold         {shown}")
    if s.clip_rate is not None:
        lines.append(f"    clip rate         {s.clip_rate:.1%}")
    lines.append(f"    non-finite steps  {s.nonfinite} (counted on {s.nonfinite_scope})")
    if s.skipped is not None:
        lines.append(f"    skipped steps     {s.skipped} (by the rule, counted on all steps)")
    if s.rule:
        lines.append(f"    rule              {s.rule}")
    lines.append(f"    suggested {s.parameter} {'-' if s.suggestion is None else f'{s.suggestion:g}'}")
    lines.extend(textwrap.wrap(s.reason, width=100, initial_indent="      why: ", subsequent_indent="      "))
    return "\n".join(lines)


def report(logdir: PathLike, output: Optional[PathLike] = None, out=None) -> list[NormSummary]:
    """Print the summary of every run under ``logdir`` and write one PNG per run; return the summaries."""
    out = sys.stdout if out is None else out
    runs = find_runs(logdir)
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under `LOGDIR` {str(logdir)!r}")
    if output is not None and len(runs) > 1:
        raise ValueError(
            f"`--output` names one PNG, but `LOGDIR` {str(logdir)!r} holds {len(runs)} runs; pass one run's directory"
        )
    everything: list[NormSummary] = []
    for run in runs:
        summaries = summarize(run)
        print(f"run {run}", file=out)
        if not summaries:
            print("  no gradient norms logged (add a clipping callback or a GradientNormMonitor)\n", file=out)
            continue
        for s in summaries:
            print(format_summary(s), file=out)
        try:
            png = plot(summaries, output or run / "gradclip_report.png", title=str(run))
            print(f"  plot: {png}\n", file=out)
        except ImportError:
            print("  plot: skipped, matplotlib is not installed (pip install 'gradclip_plugin[report]')\n", file=out)
        everything.extend(summaries)
    return everything


def main(argv: Optional[list[str]] = None) -> int:
    """The ``gradclip`` console script."""
    parser = argparse.ArgumentParser(prog="gradclip", description="gradclip_plugin tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="summarise gradient norms from TensorBoard logs and advise on the clipping threshold",
        description=__doc__.split("\n\n")[1],
    )
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
