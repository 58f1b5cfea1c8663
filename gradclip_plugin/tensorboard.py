"""What the gradclip callbacks show in TensorBoard: the Custom Scalars layout, each callback's text, the report's figure.

The layout (``SummaryWriter.add_custom_scalars``) is written once per run from what each callback says
it logs: for a clipping callback, the pre-clip norm with the threshold in one chart, and what the
optimizer received as a line with the part clipping cut off as a band above it; the clip rates; each
monitor's total norm. The Text tab gets each callback's class with its arguments, at
``<prefix>/callback`` (which ``gradclip report`` reads to name the rule). The Images tab gets
``gradclip report``'s figure at ``clipping/report`` (:func:`write_figure`): on a log axis it shows the
spikes that a linear chart with outliers ignored cannot. :func:`write_fabric` writes all three from a
Fabric loop.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Optional

from gradclip_plugin import names

__all__ = ["CATEGORY", "NO_MATPLOTLIB", "charts", "describe", "write_callbacks", "write_fabric", "write_figure", "write_layout"]

#: the title of the category the charts are grouped under in the Custom Scalars dashboard
CATEGORY = "gradclip"
#: the warning for a figure asked for without matplotlib (:func:`write_figure` returned ``False``)
NO_MATPLOTLIB = 'gradclip: TensorBoard\'s Images tab gets no report figure without matplotlib: pip install "gradclip_plugin[report]"'


def write_layout(writer: Any, charts: dict[str, tuple[str, list[str]]], tag_prefix: str = "") -> None:
    """Write ``charts`` as the run's custom-scalars layout.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        charts: ``{chart title: ("Multiline", [metric names])}`` (the metrics overlaid as lines), or
            ``{chart title: ("Margin", [value, lower, upper])}`` (a line and a band around it).
        tag_prefix: what the logger puts before each metric name (``TensorBoardLogger(prefix=...)``).
    """
    if charts:
        layout = {  # a Multiline chart takes regular expressions, a Margin chart tag names
            title: [kind, [f"^{re.escape(tag_prefix + n)}$" if kind == "Multiline" else tag_prefix + n for n in names_]]
            for title, (kind, names_) in charts.items()
        }
        writer.add_custom_scalars({CATEGORY: layout})


def describe(callback: Any) -> str:
    """``callback``'s class with the arguments of its ``__init__`` as it holds them:
    ``"ClipByGlobalNorm(max_norm=50.0, norm_type=2.0, ...)"``."""
    args = [p for p in inspect.signature(type(callback).__init__).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY]
    shown = ", ".join(f"{p.name}={getattr(callback, p.name)!r}" for p in args[1:] if hasattr(callback, p.name))
    return f"{type(callback).__name__}({shown})"


def charts(callback: Any, n: int) -> dict[str, tuple[str, list[str]]]:
    """What ``callback`` logs with ``n`` optimizers, as ``{chart title: (kind, [metric names])}``.

    TensorBoard gives every series of a chart its run's colour (and each a marker of its own), and by
    default scales the y axis to the 5th-95th percentiles of the smoothed values: a chart draws the
    steady level, and a spike leaves through its top. So a clipping callback's pre-clip norm (the
    largest since the last log, ``norm_max``, and the last) shares a chart with its threshold, where
    clipping shows as the norm crossing it; what the optimizer received is a line with the part
    clipped off as a band above it (a Margin chart), and the steps a rule skipped (a rule that never
    clips, SkipSpikes, has no band and no clip rate); a monitor's total norm (largest and last) and
    each group's weight norm and update ratio are one chart each, where runs compare.
    """
    key = callback._metric_key
    if hasattr(callback, "clip_"):
        out: dict[str, tuple[str, list[str]]] = {}
        for i in range(n):
            peak, norm, threshold, clipped = (key(k, i, n) for k in (names.NORM_MAX, names.NORM, names.THRESHOLD, names.NORM_CLIPPED))
            prefix = norm[: -len(names.NORM) - 1]
            out[f"{prefix}: pre-clip norm and threshold"] = ("Multiline", [peak, norm, threshold])
            if callback.clips:
                out[f"{prefix}: what the optimizer received (line), the part clipped off (band)"] = ("Margin", [clipped, clipped, norm])
            if callback._skips_steps:
                out[f"{prefix}: steps skipped"] = ("Multiline", [key(names.SKIPPED_STEPS, i, n)])
        return out | ({names.CLIP_RATE: ("Multiline", [key(names.CLIP_RATE, i, n) for i in range(n)])} if callback.clips else {})
    out = {key(names.TOTAL, i, n): ("Multiline", [key(names.TOTAL_MAX, i, n), key(names.TOTAL, i, n)]) for i in range(n)}
    for what, on in ((names.WEIGHT, callback.weight_norms), (names.UPDATE_RATIO, callback.update_ratio)):
        for i, plan in enumerate(callback._plans.values() if on else []):  # made in optimizer order at fit start
            out |= {k: ("Multiline", [k]) for k in (key(f"{what}/{g}", i, n) for g in plan.group_names)}
    return out


def write_callbacks(writers: list[tuple[Any, str]], callbacks: list[Any], n_optimizers: int) -> None:
    """For each ``(SummaryWriter, tag prefix)`` of ``writers``: the layout of all ``callbacks`` (a title two
    of them share, ``clip_rate``, is one chart of both) and each callback's text."""
    layout: dict[str, tuple[str, list[str]]] = {}
    for cb in callbacks:
        for title, (kind, keys) in charts(cb, n_optimizers).items():
            layout.setdefault(title, (kind, []))[1].extend(keys)
    for writer, tag_prefix in writers:
        write_layout(writer, layout, tag_prefix)
        for cb in callbacks:
            writer.add_text(f"{tag_prefix}{cb._key_prefix}/{names.RULE}", describe(cb))


def write_figure(writer: Any, step: int, tag_prefix: str = "") -> bool:
    """Write ``gradclip report``'s figure of the run ``writer`` writes (its event files so far) to the Images
    tab, at ``<tag_prefix>clipping/report`` and ``step``; nothing if the run has no gradient norms yet.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).
        step: the global step the figure is shown at (the Images tab has a slider over them).
        tag_prefix: what the logger puts before each metric name (``TensorBoardLogger(prefix=...)``).

    Returns:
        ``False`` (and nothing written) without matplotlib: warn with :data:`NO_MATPLOTLIB`.
    """
    try:
        import matplotlib  # noqa: F401  (the figure's; its absence is reported, not raised)
    except ImportError:
        return False
    from gradclip_plugin.report import figure, summarize

    writer.flush()  # the scalars written so far, into the event files read here
    run = Path(writer.get_logdir())
    summaries = summarize(run)
    if summaries:
        # `clipping/` sorts before Lightning's `epoch`: the figure is the first card of the Time Series tab
        writer.add_figure(f"{tag_prefix}clipping/report", figure(summaries, f"run {run.name}, step {step}"), global_step=step)
        writer.flush()  # on disk now: TensorBoard and `gradclip report` see it without waiting for the writer's timer
    return True


def write_fabric(fabric: Any, *callbacks: Any, step: Optional[int] = None) -> bool:
    """What a Trainer's callbacks write to TensorBoard, from a Fabric loop: to each TensorBoard logger of
    ``fabric.loggers`` (on rank zero), the Custom Scalars layout of ``callbacks`` and each one's text
    (:func:`write_callbacks`, one optimizer each) and, with ``step``, the report's figure (:func:`write_figure`).

    Call it after the loop's first optimizer step (a monitor names its groups then) and again, with
    ``step``, at its end (or every N steps)::

        gradclip_plugin.tensorboard.write_fabric(fabric, clip, monitor, step=step)

    Returns:
        ``False`` if the figure was asked for and matplotlib is missing (warn with :data:`NO_MATPLOTLIB`).
    """
    loggers = [lg for lg in fabric.loggers if fabric.is_global_zero and hasattr(lg.experiment, "add_custom_scalars")]
    writers = [(lg.experiment, f"{lg._prefix}{lg.LOGGER_JOIN_CHAR}" if getattr(lg, "_prefix", "") else "") for lg in loggers]
    write_callbacks(writers, list(callbacks), 1)
    return all([write_figure(w, step, prefix) for w, prefix in writers if step is not None])
