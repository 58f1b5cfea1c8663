#!/usr/bin/env python
"""Stability benchmark on real text: does a clipping rule keep a too-high learning rate from spiking?

A small causal transformer on bytes is trained with the Lightning ``Trainer`` (the callbacks run as
users run them), once per rule, with the same seed, the same initial weights and the same batches:
no clipping, ``ClipByGlobalNorm(1.0)``, ``ZClip()``, ``AdaGC()`` and ``SkipSpikes()`` with
``ClipByGlobalNorm(1.0)``.

The text: a fixed list of Python standard-library modules (``STDLIB_FILES``, in that order, read from
``sysconfig.get_paths()["stdlib"]``), concatenated as bytes (ids 0-255); the last 10% is held out for
validation. Text that no one here wrote and that every machine has. A file missing from this Python
is skipped with a message; the files' contents differ a little between Python versions, so numbers
are comparable within one Python version.

The learning rate (AdamW, a linear warm-up over ``--warmup`` steps, then constant) is deliberately
too high, so that the unclipped run has loss spikes (with the defaults: one spike event, at step 886,
on Python 3.11 with torch 2.13 on 2 CPU threads; which step spikes depends on floating-point details).
Reported per run: the final validation loss (mean cross-entropy in nats per byte over the whole
held-out text, in non-overlapping windows), the number of loss spikes (a step whose
training loss is above the mean of the previous ``--spike-window`` steps by more than
``--spike-sigmas`` of their standard deviations), the steps the callbacks skipped (``skipped_steps``
plus ``nonfinite_steps``), and the median time of a training step (forward, backward, clipping,
optimizer step; ``on_train_batch_start`` to ``on_train_batch_end``). The training-loss curves of all
runs go to ``docs/stability.png``.

``make stability`` runs the defaults (about 4-5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# Present, as modules (not packages), in Python 3.9 to 3.13; in this order.
STDLIB_FILES = [
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "contextlib.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "operator.py", "pprint.py", "queue.py", "random.py", "shutil.py",
    "statistics.py", "string.py", "textwrap.py", "threading.py", "typing.py", "weakref.py",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def load_text(max_bytes: Optional[int]) -> tuple[bytes, list[str], list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, used, missing = [], [], []
    for name in STDLIB_FILES:
        path = stdlib / name
        if not path.is_file():
            print(f"note: {path} is missing in this Python; skipped", flush=True)
            missing.append(name)
            continue
        parts.append(path.read_bytes())
        used.append(name)
    data = b"".join(parts)
    if max_bytes:
        data = data[:max_bytes]
    return data, used, missing


class Batches(torch.utils.data.Dataset):
    """``steps`` batches of random training windows, fixed by ``seed`` (the same for every run)."""

    def __init__(self, ids: Tensor, steps: int, batch: int, context: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids, self.context = ids, context
        self.starts = torch.randint(0, len(ids) - context - 1, (steps, batch), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        idx = self.starts[i].unsqueeze(1) + torch.arange(self.context + 1)
        w = self.ids[idx]
        return w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------------------------- model
def make_module(args: argparse.Namespace) -> Any:
    import pytorch_lightning as pl

    class CharTransformer(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            d = args.d_model
            self.embed = nn.Embedding(256, d)
            self.pos = nn.Parameter(torch.randn(args.context, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, args.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=args.norm == "pre")
            self.blocks = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 256)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(args.context), persistent=False)
            self.losses: list[float] = []

        def forward(self, x: Tensor) -> Tensor:
            n = x.shape[1]
            h = self.embed(x) + self.pos[:n]
            h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
            return self.head(self.norm(h))

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            opt = torch.optim.AdamW(self.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay)
            if not args.warmup:
                return opt
            warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / args.warmup))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    return CharTransformer()


@torch.no_grad()
def validation_loss(model: nn.Module, ids: Tensor, context: int, batch: int = 64) -> float:
    model.eval()
    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(x[i : i + batch])
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"))
    model.train()
    return total / (n * context)


# ---------------------------------------------------------------------------------------------- runs
def spikes(losses: list[float], window: int, sigmas: float) -> list[int]:
    """Steps whose loss is above the mean of the previous ``window`` losses by ``sigmas`` std's."""
    out = []
    for i in range(window, len(losses)):
        prev = losses[i - window : i]
        if not all(math.isfinite(v) for v in prev):
            continue
        mean = statistics.fmean(prev)
        std = statistics.pstdev(prev)
        if not math.isfinite(losses[i]) or losses[i] > mean + sigmas * std:
            out.append(i)
    return out


def max_z(losses: list[float], window: int) -> float:
    """The largest z-score of a training loss against the previous ``window`` losses."""
    best = 0.0
    for i in range(window, len(losses)):
        prev = losses[i - window : i]
        std = statistics.pstdev(prev) if all(math.isfinite(v) for v in prev) else math.nan
        if std > 0 and math.isfinite(losses[i]):
            best = max(best, (losses[i] - statistics.fmean(prev)) / std)
    return best


def skipped(callbacks: list[Any]) -> int:
    """Steps the callbacks skipped (``skipped_steps`` + ``nonfinite_steps``), from their state (a step one of
    them skips on the host is not seen by the next)."""
    tallies = [t for cb in callbacks for t in cb.state_dict()["tallies"].values()]
    return sum(t["skipped"] + t["steps"] - t["finite"] for t in tallies)


def run_one(name: str, make_callbacks: Callable[[], list[Any]], args: argparse.Namespace, train: Tensor, val: Tensor) -> dict[str, Any]:
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, *_: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, *_: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    pl.seed_everything(args.seed, verbose=False)
    model = make_module(args)
    data = torch.utils.data.DataLoader(Batches(train, args.steps, args.batch, args.context, args.seed), batch_size=None, shuffle=False)
    clip = make_callbacks()
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, precision="32-true", callbacks=[*clip, timer],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=50, num_sanity_val_steps=0, deterministic=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    error = None
    try:
        trainer.fit(model, data)
    except Exception as exc:  # a rule that stops the fit (max_consecutive_skips) is a result too
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    wall = time.perf_counter() - t0
    losses = model.losses
    spk = spikes(losses, args.spike_window, args.spike_sigmas)
    vloss = validation_loss(model, val, args.context)
    return {
        "name": name, "losses": losses, "spikes": spk, "val": vloss, "skipped": skipped(clip),
        "skipped_at": [s.global_step for cb in clip for s in getattr(cb, "skipped", [])],  # SkipSpikes' record
        "max_z": max_z(losses, args.spike_window), "ms": 1000 * statistics.median(timer.times[5:] or timer.times), "wall": wall, "error": error,
        "final_train": statistics.fmean(losses[-50:]) if losses else math.nan,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- plot
def plot(results: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm_s = f"linear warm-up over {args.warmup} steps, then constant" if args.warmup else "no warm-up, constant"
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for r, c in zip(results, colors):
        ls = r["losses"]
        steps = range(1, len(ls) + 1)
        label = f"{r['name']}: {len(r['spikes'])} spikes, val {r['val']:.3f}" + (f", {r['skipped']} skipped (x)" if r["skipped"] else "")
        ax.plot(steps, ls, color=c, lw=0.8, alpha=0.85, label=label)
        if r["skipped_at"]:
            ax.scatter([s + 1 for s in r["skipped_at"]], [ls[s] for s in r["skipped_at"]], color=c, marker="x", s=30, zorder=4)
        if r["spikes"]:
            ax.scatter([s + 1 for s in r["spikes"]], [ls[s] for s in r["spikes"]], color=c, s=22, zorder=3, edgecolor="black", linewidth=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per byte, log scale)")
    ax.set_title(
        f"Byte-level {args.norm}-LN transformer on Python stdlib source, AdamW lr={args.lr:g} ({warm_s}), batch {args.batch}\n"
        f"dots: spikes (loss > mean + {args.spike_sigmas:g} std of the previous {args.spike_window} steps); x: steps SkipSpikes skipped",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pytorch_lightning as pl

    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"pytorch_lightning {pl.__version__}, Python {platform.python_version()}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-1)
    p.add_argument("--norm", choices=["pre", "post"], default="pre", help="LayerNorm before (pre-LN) or after (post-LN) each sublayer")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW eps")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up over this many steps, then constant (0: none)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=0, help="use only the first N bytes of the text (0: all)")
    p.add_argument("--spike-window", type=int, default=50)
    p.add_argument("--spike-sigmas", type=float, default=6.0)
    p.add_argument("--runs", default="none,global,zclip,adagc,skipspikes", help="comma-separated subset")
    p.add_argument("--plot", default=str(ROOT / "docs" / "stability.png"), help="'' for none")
    args = p.parse_args(argv)

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    warnings.filterwarnings("ignore", message=".*TF32.*")

    from gradclip_plugin import AdaGC, ClipByGlobalNorm, SkipSpikes, ZClip

    all_runs: dict[str, tuple[str, Callable[[], list[Any]]]] = {
        "none": ("no clipping", lambda: []),
        "global": ("ClipByGlobalNorm(1.0)", lambda: [ClipByGlobalNorm(1.0)]),
        "zclip": ("ZClip()", lambda: [ZClip()]),
        "adagc": ("AdaGC()", lambda: [AdaGC()]),
        "skipspikes": ("SkipSpikes() + ClipByGlobalNorm(1.0)", lambda: [SkipSpikes(), ClipByGlobalNorm(1.0)]),
    }
    wanted = [k.strip() for k in args.runs.split(",") if k.strip()]

    t_start = time.perf_counter()
    data, used, missing = load_text(args.max_bytes or None)
    ids = torch.tensor(list(data), dtype=torch.long)
    cut = int(len(ids) * 0.9)
    train, val = ids[:cut], ids[cut:]
    print(f"text: {len(used)} stdlib files, {len(ids):,} bytes ({len(train):,} train, {len(val):,} validation)", flush=True)

    results = []
    for key in wanted:
        name, factory = all_runs[key]
        r = run_one(name, factory, args, train, val)
        results.append(r)
        print(
            f"{name}: val {r['val']:.4f}, spikes {len(r['spikes'])} at steps {[s + 1 for s in r['spikes']][:12]}, "
            f"max z {r['max_z']:.1f}, skipped {r['skipped']} {[s + 1 for s in r['skipped_at']][:20]}, {r['ms']:.1f} ms/step, {r['wall']:.0f} s" + (f", STOPPED: {r['error']}" if r["error"] else ""),
            flush=True,
        )
    if args.plot and results:
        plot(results, Path(args.plot), args)
    total = time.perf_counter() - t_start

    params = sum(p.numel() for p in make_module(args).parameters())
    warm_s = f"linear warm-up over {args.warmup} steps, then constant lr" if args.warmup else "no warm-up, constant lr"
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    print()
    print(f"Machine: {machine()}  ")
    print(f"Command: `{cmd}`  ")
    print(
        f"Settings: {args.layers}-layer {args.norm}-LN causal transformer (torch.nn.TransformerEncoder), d_model={args.d_model}, "
        f"heads={args.heads}, context={args.context}, {params:,} parameters, byte vocabulary (256); batch={args.batch}, "
        f"steps={args.steps}, AdamW lr={args.lr:g} betas=({args.beta1:g}, {args.beta2:g}) eps={args.eps:g} weight_decay={args.weight_decay:g}, "
        f"{warm_s}; seed={args.seed} (same initial weights and batches in every run); precision=32-true  "
    )
    print(
        f"Data: {len(used)} Python {platform.python_version()} stdlib files in this order: {', '.join(used)}"
        + (f" (missing: {', '.join(missing)})" if missing else "")
        + f"; {len(ids):,} bytes, last 10% ({len(val):,}) held out  "
    )
    print(
        f"Spike: a step whose training loss is above the mean of the previous {args.spike_window} steps' losses by more than "
        f"{args.spike_sigmas:g} of their (population) standard deviations (steps {args.spike_window + 1} on)  "
    )
    print(f"Wall time: {total:.0f} s for all runs  ")
    print()
    print("| run | final val loss | loss spikes | max loss z-score | steps skipped | final train loss (last 50 mean) | ms/step (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        val_s = f"{r['val']:.4f}" if math.isfinite(r["val"]) else "nan"
        extra = f" (stopped: {r['error']})" if r["error"] else ""
        print(f"| {r['name']}{extra} | {val_s} | {len(r['spikes'])} | {r['max_z']:.1f} | {r['skipped']} | {r['final_train']:.4f} | {r['ms']:.1f} |")
    if args.plot and results:
        print(f"\nPlot: {os.path.relpath(args.plot, ROOT)}")
    print(f"Date: {datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
