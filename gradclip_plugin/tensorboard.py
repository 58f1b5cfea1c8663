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

def tag_pattern(name: str) -> str:
    """The regular expression (the layout's tags are regexes) for metric ``name``: that name exactly, or,
    for a name ending in ``/*``, every name one level below it (``grad_norm/*``: ``grad_norm/encoder``...)."""
    if name.endswith("/*"):
        return f"^{re.escape(name[:-1])}[^/]+$"
    return f"^{re.escape(name)}$"


def write_layout(writer: Any, charts: dict[str, list[str]], tag_prefix: str = "") -> None:
    """Write ``charts`` (``{chart title: [metric names]}``) as the run's custom-scalars layout.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        charts: the metric names overlaid in each chart (see :func:`tag_pattern`).
        tag_prefix: what the logger puts before each metric name (``TensorBoardLogger(prefix=...)``).
    """
    if charts:
        layout = {title: ["Multiline", [tag_pattern(tag_prefix + n) for n in names]] for title, names in charts.items()}
        writer.add_custom_scalars({CATEGORY: layout})
