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

__all__ = ["CATEGORY", "describe", "write_callbacks", "write_layout"]

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


def write_callbacks(writers: list[tuple[Any, str]], callbacks: list[Any], n_optimizers: int) -> None:
    """For each ``(SummaryWriter, tag prefix)`` of ``writers``: the layout of all ``callbacks`` (a title two
    of them share, ``clip_rate``, is one chart of both) and each callback's text."""
    charts: dict[str, tuple[str, list[str]]] = {}
    for cb in callbacks:
        for title, (kind, keys) in cb._charts(n_optimizers).items():
            charts.setdefault(title, (kind, []))[1].extend(keys)
    for writer, tag_prefix in writers:
        write_layout(writer, charts, tag_prefix)
        for cb in callbacks:
            writer.add_text(f"{tag_prefix}{cb._key_prefix}/{names.RULE}", describe(cb))
