"""What the gradclip callbacks show in TensorBoard: the Custom Scalars layout and each callback's text.

The layout (``SummaryWriter.add_custom_scalars``) is written once per run from what each callback says
it logs (its ``_charts``): for a clipping callback, the post-clip norm as a line and the part clipping
cut off as a band above it, every threshold and every clip rate. The Text tab gets each callback's class
with its arguments, at ``<prefix>/callback`` (which ``gradclip report`` reads to name the rule).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from gradclip_plugin import names

__all__ = ["CATEGORY", "charts", "describe", "write_callbacks", "write_layout"]

#: the title of the category the charts are grouped under in the Custom Scalars dashboard
CATEGORY = "gradclip"


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

    TensorBoard gives every series of a chart its run's colour, so a chart holds one series of each
    run: a clipping callback's post-clip norm is a line with the part clipped off as a band above it
    (a Margin chart), which three lines of one colour could not tell apart; a monitor's total, and each
    group's weight norm and update ratio, are one chart each.
    """
    key = callback._metric_key
    if hasattr(callback, "clip_"):
        out: dict[str, tuple[str, list[str]]] = {names.THRESHOLD: ("Multiline", []), names.CLIP_RATE: ("Multiline", [])}
        for i in range(n):
            norm, clipped = key(names.NORM, i, n), key(names.NORM_CLIPPED, i, n)
            out[f"{norm[: -len(names.NORM) - 1]}: post-clip norm (line), and the part clipped off (band)"] = ("Margin", [clipped, clipped, norm])
            out[names.THRESHOLD][1].append(key(names.THRESHOLD, i, n))
            out[names.CLIP_RATE][1].append(key(names.CLIP_RATE, i, n))
        return out
    keys = [key(k, i, n) for i in range(n) for k in (names.TOTAL_MAX, names.TOTAL)]
    for what, on in ((names.WEIGHT, callback.weight_norms), (names.UPDATE_RATIO, callback.update_ratio)):
        for i, plan in enumerate(callback._plans.values() if on else []):  # made in optimizer order at fit start
            keys += [key(f"{what}/{g}", i, n) for g in plan.group_names]
    return {k: ("Multiline", [k]) for k in keys}


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
