#!/usr/bin/env python
"""How often SkipSpikes' decisions differ from OLMo-core's on near-ties: random sequences of values equal to
``--digits`` significant digits (1 + N(0, 10**-digits)), decided by ``spike_update`` and by
``SkipStepOptimizer.get_step_factor`` (``ai2-olmo-core``). Usage:
``python benchmarks/spike_rounding.py --digits 6 --window 16 --sigma 2 --watch both --sequences 200 --length 500``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from olmo_core.optim.skip_step_optimizer import SkipStepOptimizer  # noqa: E402

from gradclip_plugin.functional.adaptive import spike_update  # noqa: E402


def differs(values: torch.Tensor, window: int, sigma: float) -> bool:
    """Whether any step of ``values`` (``(length, k)``: the loss, and the norm if ``k == 2``) is decided otherwise."""
    ref = SkipStepOptimizer([torch.zeros(1)], {}, rolling_interval_length=window, sigma_factor=sigma)
    state = None
    for x in values:
        ref.latest_loss = x[0]
        if len(x) == 2:
            ref.latest_grad_norm = x[1]
        state, skip, _ = spike_update(state, x, window=window, sigma=sigma)
        if bool(skip) != bool(ref.step_skipped):
            return True
    return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--digits", type=int, default=6)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--sigma", type=float, default=2.0)
    p.add_argument("--watch", choices=["loss", "both"], default="both")
    p.add_argument("--sequences", type=int, default=200)
    p.add_argument("--length", type=int, default=500)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    k = 2 if a.watch == "both" else 1
    n = sum(differs(1 + 10.0**-a.digits * torch.randn(a.length, k, generator=g), a.window, a.sigma) for _ in range(a.sequences))
    print(f"digits {a.digits}, window {a.window}, sigma {a.sigma:g}, watch {a.watch}: {n} of {a.sequences} sequences "
          f"of {a.length} values decided differently at some step")


if __name__ == "__main__":
    main()
