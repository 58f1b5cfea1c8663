"""TensorBoard's "Custom Scalars" layout: several of a run's scalars overlaid in one chart.

The layout is written once per run (``SummaryWriter.add_custom_scalars``) from what each gradclip
callback says it logs (its ``charts``): for a clipping callback, the pre-clip norm, the post-clip
norm and the threshold in one chart. This module knows nothing of the callbacks themselves.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["CATEGORY", "write_layout"]

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
            title: [kind, [f"^{re.escape(tag_prefix + n)}$" if kind == "Multiline" else tag_prefix + n for n in names]]
            for title, (kind, names) in charts.items()
        }
        writer.add_custom_scalars({CATEGORY: layout})
