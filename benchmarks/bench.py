#!/usr/bin/env python
"""Side-by-side benchmarks of gradclip_plugin against torch, Lightning and the reference packages.

One process, warm-up first, then PAIRED repetitions: each repetition times the gradclip_plugin
variant (A) and the reference (B) back to back, alternating which goes first, and the table gives
the median of the per-pair ratios A/B (with its 25th-75th percentiles) next to the median absolute
times. Pairing cancels most of the drift a shared machine adds; the spread shows what is left.

Sections (``--sections``, comma-separated; all by default):

``ops``       the functional ops vs ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``
              (``foreach=True``) on GPT-2-small-shaped gradients, float32 and bfloat16, with
              clipping firing and not firing. Target: ``clip_by_global_norm_`` <= 1.05x torch.
``monitor``   ``GradientNormMonitor`` on a logging step vs Lightning's ``grad_norm`` utility plus
              the dict of floats a logger needs; both timed inside a real ``Trainer`` step. And a
              training step (forward, backward, AdamW) with the monitor's per-step pass (a step that
              does not log) vs the same step without it. Target (CUDA, GPT-2-small shapes): <= 1.01x.
``train``     a small transformer trained with Lightning: ``ClipByGlobalNorm`` +
              ``GradientNormMonitor`` logging every step vs ``Trainer(gradient_clip_val=...)``
              with no logging, and vs ``gradient_clip_val`` plus the ``grad_norm`` logging hook.
              Target: <= 1.03x the built-in clipping with no logging.
``adaptive``  ``ZClip`` and ``AutoClip`` (and AGC) vs the ``zclip`` and ``autoclip`` packages
              (``pip install -r benchmarks/requirements.txt``) and the papers' reference loops.
              Target: faster than the reference packages (ratio < 1).
``scaling``   the whole ``ClipByGlobalNorm`` hook (``on_before_optimizer_step`` of a real fit, a
              step that does not log) vs ``clip_grad_norm_(foreach=True)`` on the same gradients,
              for 100, 1000 and 4000 tensors of 4096 float32, ``nonfinite="skip"`` (the default)
              and ``"ignore"``, clipping firing and not. Targets: at 100 tensors at most torch's
              time + 0.1 ms (the median per-pair difference); from 1000 tensors on at most 1.05x.

Run ``python benchmarks/bench.py --help`` for the sizes; ``make bench`` runs the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

SECTIONS = ("ops", "monitor", "train", "adaptive", "scaling")

# --------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    """One A-vs-B comparison: absolute medians and the median of the per-pair ratios."""

    section: str
    what: str  # "A vs B"
    case: str
    a_ms: float
    b_ms: float
    ratio: float  # median of per-pair A/B
    ratio_lo: float  # 25th percentile of per-pair A/B
    ratio_hi: float  # 75th percentile
    target: Optional[float] = None  # A/B must be <= target
    note: str = ""
    diff_ms: Optional[float] = None  # median of per-pair A - B
    target_ms: Optional[float] = None  # A - B must be <= target_ms

    @property
    def verdict(self) -> str:
        if self.target_ms is not None:
            return "PASS" if self.diff_ms is not None and self.diff_ms <= self.target_ms else "MISS"
        if self.target is None:
            return ""
        return "PASS" if self.ratio <= self.target else "MISS"

    @property
    def target_text(self) -> str:
        if self.target_ms is not None:
            return f"<= +{self.target_ms:g} ms"
        return f"<= {self.target:g}" if self.target is not None else ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.what} [{row.case}]: {row.a_ms:.3f} ms vs {row.b_ms:.3f} ms, ratio {row.ratio:.3f}"
              f" [{row.ratio_lo:.3f}, {row.ratio_hi:.3f}] {row.verdict}", flush=True)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


class Timer:
    """Time of a call; on CUDA the device is synchronized before and after (outside the op).

    ``clock="wall"`` is ``time.perf_counter``. ``clock="process"`` is the CPU time of this process
    (all its threads), which time spent by other jobs on a shared machine does not inflate: for CPU
    runs only, best with ``--threads 1``.
    """

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if clock == "process" else time.perf_counter

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], before: Optional[Callable[[], Any]] = None) -> float:
        if before is not None:
            before()
        self.sync()
        t0 = self.now()
        fn()
        self.sync()
        return self.now() - t0


def paired(
    timer: Timer,
    a: Callable[[], Any],
    b: Callable[[], Any],
    reps: int,
    warmup: int,
    before: Optional[Callable[[], Any]] = None,
    diffs: Optional[list[float]] = None,
) -> tuple[float, float, float, float, float]:
    """Time ``a`` and ``b`` in ``reps`` pairs (alternating which runs first) after ``warmup`` pairs.

    ``before`` runs, untimed, before every timed call (e.g. to restore the gradients); ``diffs``, if
    given, receives each pair's ``a - b`` in ms.
    Returns ``(median a ms, median b ms, median a/b, p25 a/b, p75 a/b)``.
    """
    for _ in range(warmup):
        timer.time(a, before)
        timer.time(b, before)
    ta, tb, ratios = [], [], []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            if i % 2 == 0:
                x = timer.time(a, before)
                y = timer.time(b, before)
            else:
                y = timer.time(b, before)
                x = timer.time(a, before)
            ta.append(x)
            tb.append(y)
            ratios.append(x / y)
            if diffs is not None:
                diffs.append((x - y) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    lo, mid, hi = quartiles(ratios)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, mid, lo, hi


# --------------------------------------------------------------------------------------------- host reads


class HostReads:
    """Counts Python-level reads of tensor values to the host (``.item()``, ``bool(t)``, ...).

    On CUDA each of these is a device sync. The same list as ``tests/test_no_sync.py``.
    """

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "HostReads":
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapper(t, *args, _orig=orig, **kwargs):
                self.count += 1
                return _orig(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


def host_reads(fn: Callable[[], Any], device: torch.device) -> str:
    """How many host reads ``fn`` makes: counted on CPU; on CUDA, also under sync debug mode "error"."""
    with HostReads() as hr:
        fn()
    text = str(hr.count)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            text += ", cuda sync debug: none"
        except RuntimeError as err:
            text += f", cuda sync debug: SYNC ({str(err).splitlines()[0]})"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return text


# --------------------------------------------------------------------------------------------- GPT-2 shapes


def gpt2_shapes(layers: int, vocab: int = 50257, ctx: int = 1024, d: int = 768) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2-small parameter names and shapes (124,439,808 parameters with 12 layers; ``lm_head`` tied).

    Linear weights are in torch's (out, in) order; HF's ``Conv1D`` stores them transposed (same size).
    """
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        out += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (3 * d, d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (4 * d, d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (d, 4 * d)), (h + "mlp.c_proj.bias", (d,)),
        ]  # fmt: skip
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def gpt2_gradients(layers: int, vocab: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """Gradient-like tensors (normal, std 0.02) with the GPT-2-small shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(s, generator=g).mul_(0.02).to(device=device, dtype=dtype) for _, s in gpt2_shapes(layers, vocab)]


# --------------------------------------------------------------------------------------------- section: ops


def section_ops(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device) -> None:
    from gradclip_plugin.functional import clip_by_global_norm_, clip_by_norm_, clip_by_value_, global_norm, tensor_norms

    clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
    clip_grad_value_ = torch.nn.utils.clip_grad_value_
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        grads = gpt2_gradients(args.layers, args.vocab, dtype, device)
        saved = [g.clone() for g in grads]
        # clip_grad_*_ read `p.grad`: zero-stride "parameters" carry the gradients at no memory cost.
        params = [torch.zeros(1, dtype=dtype, device=device).expand(g.shape) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        n = sum(g.numel() for g in grads)
        nbytes = n * grads[0].element_size()
        exact = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).cpu()  # float64 reference
        norm = float(torch.linalg.vector_norm(exact))
        print(f"[ops] {dtype_name}: {len(grads)} tensors, {n / 1e6:.1f}M elements, {nbytes / 2**20:.0f} MiB, "
              f"global norm {norm:.1f}", flush=True)

        def restore() -> None:
            torch._foreach_copy_(grads, saved)

        copy_ms = paired(timer, restore, restore, args.reps, args.warmup)[0]
        copy_gbs = 2 * nbytes / (copy_ms / 1e3) / 1e9
        report.notes.append(f"ops/{dtype_name}: device copy of all gradients {copy_ms:.2f} ms "
                            f"({copy_gbs:.1f} GB/s counting read+write)")

        cases = {"fires": (norm / 4, 0.02), "no clip": (norm * 4, 1e3)}  # (max_norm, clip_value)
        for case, (max_norm, clip_value) in cases.items():
            a_ms, b_ms, r, lo, hi = paired(
                timer,
                lambda: clip_by_global_norm_(grads, max_norm),
                lambda: clip_grad_norm_(params, max_norm, foreach=True),
                args.reps, args.warmup, before=restore,
            )
            gbs = 3 * nbytes / (a_ms / 1e3) / 1e9  # read for the norm, read + write for the scaling
            report.add(Row("ops", "clip_by_global_norm_ vs torch clip_grad_norm_(foreach=True)", f"{dtype_name}, {case}",
                           a_ms, b_ms, r, lo, hi, target=args.target_ops if dtype == torch.float32 else None,
                           note=f"{gbs:.1f} GB/s (3 passes) = {gbs / copy_gbs:.0%} of copy"))
            a_ms, b_ms, r, lo, hi = paired(
                timer,
                lambda: clip_by_value_(grads, clip_value),
                lambda: clip_grad_value_(params, clip_value, foreach=True),
                args.reps, args.warmup, before=restore,
            )
            report.add(Row("ops", "clip_by_value_ vs torch clip_grad_value_(foreach=True)", f"{dtype_name}, {case}",
                           a_ms, b_ms, r, lo, hi))
            per_tensor = max_norm / math.sqrt(len(grads))
            a_ms, b_ms, r, lo, hi = paired(
                timer,
                lambda: clip_by_norm_(grads, per_tensor),
                lambda: [clip_grad_norm_([p], per_tensor, foreach=True) for p in params],
                args.reps, args.warmup, before=restore,
            )
            report.add(Row("ops", "clip_by_norm_ vs a loop of torch clip_grad_norm_ per tensor", f"{dtype_name}, {case}",
                           a_ms, b_ms, r, lo, hi))
        if get_total_norm is not None:
            a_ms, b_ms, r, lo, hi = paired(
                timer, lambda: global_norm(grads), lambda: get_total_norm(grads, foreach=True), args.reps, args.warmup
            )
            report.add(Row("ops", "global_norm vs torch get_total_norm(foreach=True)", dtype_name, a_ms, b_ms, r, lo, hi))
        # accuracy against the float64 norms (torch's half-precision kernels round each norm to the dtype)
        restore()  # the timed calls above left clipped gradients
        ours_err = ((tensor_norms(grads).double().cpu() - exact) / exact).abs().max()
        ref_total = get_total_norm(grads, foreach=True) if get_total_norm is not None else clip_grad_norm_(params, math.inf)
        report.notes.append(
            f"ops/{dtype_name}: relative error against float64: gradclip per-tensor norms at most {ours_err:.1e}, "
            f"global norm {abs(float(global_norm(grads)) / norm - 1):.1e}; torch's global norm {abs(float(ref_total) / norm - 1):.1e}"
        )
        reads = host_reads(lambda: clip_by_global_norm_(grads, norm / 4), device)
        report.notes.append(f"ops/{dtype_name}: host reads in one clip_by_global_norm_ call: {reads}")
        del grads, saved, params
        gc.collect()


# --------------------------------------------------------------------------------------------- Lightning helpers


def quiet_lightning() -> None:
    import pytorch_lightning  # noqa: F401  (it sets its loggers' level on import: set ours after)

    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*is an invalid version and will not be supported.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _set_param(root: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        child = getattr(mod, part, None) if part in mod._modules else None
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    mod.register_parameter(leaf, param)


def make_gpt2_gradient_module(layers: int, vocab: int):
    """A LightningModule with GPT-2-small's parameter names and shapes whose gradient is the weight itself."""
    import pytorch_lightning as pl

    class GPT2Gradients(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            for name, shape in gpt2_shapes(layers, vocab):
                _set_param(self, name, nn.Parameter(torch.randn(shape, generator=g).mul_(0.02)))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return 0.5 * sum((p * p).sum() for p in self.parameters())  # d/dp = p: big, GPT-2-like gradients

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return GPT2Gradients()


def null_logger():
    """A logger that accepts everything and writes nothing: timings show the callback, not the file I/O."""
    from pytorch_lightning.loggers.logger import Logger

    class NullLogger(Logger):
        name = "null"
        version = 0

        @property
        def experiment(self) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    return NullLogger()


def step_models(args: argparse.Namespace) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """The modules whose gradients the `monitor` and `adaptive` sections use: (label, model, loader).

    GPT-2-small shapes: few large tensors, where every method is bound by memory traffic.
    TinyLM (the `train` section's model): many small tensors, where Python and per-tensor
    overheads (and on a GPU, syncs) decide.
    """
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(args.lm_vocab, (4 * args.lm_batch, args.lm_seq + 1), generator=g)

    def lm_loader() -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=args.lm_batch)

    def gpt2_loader() -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=1)

    models = {
        "gpt2": (f"GPT-2-small shapes, {args.step_layers} layers",
                 lambda: make_gpt2_gradient_module(args.step_layers, args.vocab), gpt2_loader),
        "tinylm": ("TinyLM", lambda: make_tiny_lm(args, False), lm_loader),
    }
    return [models[m] for m in args.step_models]


def run_in_step(args: argparse.Namespace, device: torch.device, body: Callable, logger: Any,
                model: Any, loader: Any) -> None:
    """Run one real Trainer optimizer step of ``model`` and call ``body`` inside it.

    ``body(trainer, pl_module, optimizer)`` runs in ``on_before_optimizer_step``, where the
    gradients are those the clipping callbacks see.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    class Driver(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            body(trainer, pl_module, optimizer)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            default_root_dir=tmp, accelerator=device.type, devices=1, max_steps=1, logger=logger,
            log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Driver()],
        )  # fmt: skip
        trainer.fit(model, loader)


def per_step_hooks(cb: Any) -> Callable:
    """Call every per-step gradient hook that ``cb`` overrides, as Lightning would before the optimizer step."""
    from pytorch_lightning.callbacks import Callback

    hooks = ("on_after_backward", "on_before_optimizer_step", "on_train_batch_end")  # the last writes the metrics
    names = [h for h in hooks if getattr(type(cb), h) is not getattr(Callback, h)]

    def call(trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for h in names:
            if h == "on_after_backward":
                cb.on_after_backward(trainer, pl_module)
            elif h == "on_before_optimizer_step":
                cb.on_before_optimizer_step(trainer, pl_module, optimizer)
            else:
                cb.on_train_batch_end(trainer, pl_module, None, None, 0)

    return call


def prepare(cb: Any, trainer: Any, pl_module: Any) -> None:
    """Run the set-up hooks of a callback that Lightning does not know about (not in ``trainer.callbacks``)."""
    cb.setup(trainer, pl_module, "fit")
    cb.on_fit_start(trainer, pl_module)
    cb.on_train_start(trainer, pl_module)


# --------------------------------------------------------------------------------------------- section: monitor


def section_monitor(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device) -> None:
    from pytorch_lightning.utilities import grad_norm

    from gradclip_plugin import GradientNormMonitor

    for label, make_model, make_loader in step_models(args):
        print(f"[monitor] {label}", flush=True)
        batch = next(iter(make_loader()))  # for the training steps timed in the body
        run_in_step(args, device, functools.partial(_monitor_body, args, report, timer, device, label,
                                                    GradientNormMonitor, grad_norm, batch),
                    logger=null_logger(), model=make_model(), loader=make_loader())


def _monitor_body(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device, label: str,
                  GradientNormMonitor: Any, grad_norm: Callable, batch: Any,  # noqa: N803
                  trainer: Any, pl_module: Any, optimizer: Any) -> None:
    step = trainer.fit_loop.epoch_loop._batches_that_stepped

    def lightning_grad_norm() -> None:
        # What `self.log_dict(grad_norm(self, norm_type=2))` costs at least: the norms and the
        # floats a logger is given (Lightning's own ResultCollection adds more on top).
        norms = grad_norm(pl_module, norm_type=2)
        metrics = {k: v.item() for k, v in norms.items()}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    monitor = GradientNormMonitor()
    prepare(monitor, trainer, pl_module)
    hook = per_step_hooks(monitor)
    a_ms, b_ms, r, lo, hi = paired(timer, lambda: hook(trainer, pl_module, optimizer), lightning_grad_norm,
                                   args.reps, args.warmup)
    report.add(Row("monitor", "GradientNormMonitor vs Lightning grad_norm + floats for the logger",
                   f"{label}, logging step", a_ms, b_ms, r, lo, hi))
    reads = host_reads(lambda: hook(trainer, pl_module, optimizer), device)
    report.notes.append(f"monitor/{label}: host reads in one GradientNormMonitor logging step: {reads}; "
                        f"Lightning grad_norm: one per parameter ({sum(1 for _ in pl_module.parameters())}) "
                        "plus one more per parameter to build the floats")
    saved_every = trainer.log_every_n_steps
    trainer.log_every_n_steps = 10**9  # now this step is not a logging step
    try:
        a_ms, b_ms, r, lo, hi = paired(timer, lambda: hook(trainer, pl_module, optimizer), lightning_grad_norm,
                                       args.reps, args.warmup)
        report.add(Row("monitor", "GradientNormMonitor vs Lightning grad_norm + floats for the logger",
                       f"{label}, NON-logging step (the monitor's per-step total-norm pass)", a_ms, b_ms, r, lo, hi,
                       note="on a step that does not log, the monitor measures the total norm for "
                            "`total_max` (one fused norm pass on the device, no host read) and writes nothing"))
        reads = host_reads(lambda: hook(trainer, pl_module, optimizer), device)
        report.notes.append(f"monitor/{label}: host reads in one GradientNormMonitor non-logging step: {reads}")
        # The per-step pass against a whole training step of the module; a monitor that measures on
        # logging steps only would cost ~0 on this step, so "without it" is the plain step.
        batch = [t.to(device) for t in batch]
        adamw = torch.optim.AdamW(pl_module.parameters(), lr=1e-6)

        def train_step(monitored: bool) -> None:
            adamw.zero_grad(set_to_none=True)
            with torch.enable_grad():  # Lightning calls this hook inside optimizer.step (no_grad)
                pl_module.training_step(batch, 0).backward()
            if monitored:
                hook(trainer, pl_module, optimizer)
            adamw.step()

        gpt2 = label.startswith("GPT-2")
        report.add(Row("monitor", "training step with the monitor's per-step pass vs the step without it",
                       f"{label}, NON-logging step, forward + backward + AdamW", *paired(
                           timer, lambda: train_step(True), lambda: train_step(False), args.reps, args.warmup),
                       target=args.target_monitor_step if device.type == "cuda" and gpt2 else None,
                       note="this module's forward is a sum of squares (no matmuls): its step is the memory-bound "
                            "part of a GPT-2-small step, so the ratio bounds that of a real one from above" if gpt2 else ""))
    finally:
        trainer.log_every_n_steps = saved_every


# --------------------------------------------------------------------------------------------- section: train


def make_tiny_lm(args: argparse.Namespace, log_grad_norm: bool):
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import grad_norm

    V, D, L, H, T = args.lm_vocab, args.lm_dim, args.lm_layers, args.lm_heads, args.lm_seq

    class TinyLM(pl.LightningModule):
        """A pre-LN causal transformer language model (GPT-style) on random tokens."""

        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(V, D)
            self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
            layer = nn.TransformerEncoderLayer(D, H, 4 * D, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, L, enable_nested_tensor=False)
            self.ln_f = nn.LayerNorm(D)
            self.head = nn.Linear(D, V)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x = batch[0]
            inp, tgt = x[:, :-1], x[:, 1:]
            h = self.tok(inp) + self.pos[: inp.shape[1]]
            h = self.blocks(h, mask=self.mask[: inp.shape[1], : inp.shape[1]], is_causal=True)
            logits = self.head(self.ln_f(h))
            return nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class TinyLMWithGradNorm(TinyLM):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            # Lightning's recommended gradient-norm logging since `track_grad_norm` was removed.
            self.log_dict(grad_norm(self, norm_type=2))

    return TinyLMWithGradNorm() if log_grad_norm else TinyLM()


def section_train(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from gradclip_plugin import ClipByGlobalNorm

    one_pass = functools.partial(ClipByGlobalNorm, group_depth="auto")  # clipping + per-group pre-clip norms
    logger_cls = TensorBoardLogger if args.logger == "tensorboard" else CSVLogger
    steps = args.train_warmup_steps + args.train_steps
    g = torch.Generator().manual_seed(0)
    data = torch.randint(args.lm_vocab, (steps * args.lm_batch, args.lm_seq + 1), generator=g)

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            timer.sync()
            self.starts.append(timer.now())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            timer.sync()
            self.starts.append(timer.now())

    def run(variant: str) -> float:
        """Median wall time of one optimizer step (between successive batch starts), after warm-up steps."""
        torch.manual_seed(0)
        times = StepTimes()
        callbacks: list = [times]
        kwargs: dict[str, Any] = {"logger": False}
        log_grad_norm = False
        tmp = tempfile.mkdtemp(prefix="gradclip-bench-")
        if variant == "builtin":
            kwargs.update(gradient_clip_val=args.max_norm)
        elif variant == "builtin+grad_norm":
            kwargs.update(gradient_clip_val=args.max_norm, logger=logger_cls(tmp, name="bench"))
            log_grad_norm = True
        elif variant == "gradclip":
            callbacks += [one_pass(args.max_norm)]
            kwargs.update(logger=logger_cls(tmp, name="bench"))
        elif variant == "gradclip, no logging":
            callbacks += [ClipByGlobalNorm(args.max_norm)]
        model = make_tiny_lm(args, log_grad_norm)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.lm_batch)
        trainer = pl.Trainer(
            default_root_dir=tmp, accelerator=device.type, devices=1, max_steps=steps, log_every_n_steps=1,
            precision=args.precision, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, **kwargs,
        )  # fmt: skip
        trainer.fit(model, loader)
        durations = [b - a for a, b in zip(times.starts, times.starts[1:])][args.train_warmup_steps:]
        return statistics.median(durations) * 1e3

    variants = ["builtin", "gradclip", "builtin+grad_norm", "gradclip, no logging"]
    print(f"[train] TinyLM: vocab {args.lm_vocab}, dim {args.lm_dim}, {args.lm_layers} layers, seq {args.lm_seq}, "
          f"batch {args.lm_batch}, {args.precision}; {args.train_rounds} rounds x {len(variants)} runs of "
          f"{args.train_warmup_steps}+{args.train_steps} steps; logger {args.logger}", flush=True)
    run("builtin")  # warm-up run: imports, allocator, thread pools
    per: dict[str, list[float]] = {v: [] for v in variants}
    gc.collect()
    for r in range(args.train_rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            per[v].append(run(v))
        print(f"  round {r + 1}: " + ", ".join(f"{v} {per[v][-1]:.2f} ms" for v in variants), flush=True)

    inter = interleaved(args, timer, device, data, one_pass, logger_cls)

    def row(a: str, b: str, what: str, target: Optional[float] = None) -> None:
        ratios = [x / y for x, y in zip(per[a], per[b])]
        lo, mid, hi = quartiles(ratios)
        report.add(Row("train", what, f"separate runs, ms per step, {args.precision}", statistics.median(per[a]),
                       statistics.median(per[b]), mid, lo, hi, target=target))

    mon = "group_depth='auto': "
    # the target: adjacent steps of one run (separate runs of identical work differ by up to +-20% on a
    # shared VM: the control row below, whose two sides do the same work, shows how much)
    lo, mid, hi = quartiles(inter["ratios"])
    report.add(Row("train", f"{mon}ClipByGlobalNorm, logging every step vs Trainer(gradient_clip_val), no logging",
                   f"steps alternating in one run, {args.precision}", statistics.median(inter["a"]),
                   statistics.median(inter["b"]), mid, lo, hi, target=args.target_train))
    row("gradclip", "builtin", f"{mon}ClipByGlobalNorm, logging every step vs Trainer(gradient_clip_val), no logging")
    row("gradclip", "builtin+grad_norm",
        f"{mon}ClipByGlobalNorm, logging every step vs gradient_clip_val + grad_norm logging hook")
    row("builtin+grad_norm", "builtin", "gradient_clip_val + grad_norm logging hook vs gradient_clip_val, no logging")
    row("gradclip, no logging", "builtin", "ClipByGlobalNorm, no logger vs gradient_clip_val, no logging")
    ia, ib = statistics.median(inter["inside_a"]), statistics.median(inter["inside_b"])
    lo, mid, hi = quartiles([x / y for x, y in zip(inter["inside_a"], inter["inside_b"])])
    report.add(Row("train", f"time inside the hooks: {mon}ClipByGlobalNorm (+ logging) vs LightningModule.clip_gradients",
                   f"same run, ms per step, {args.precision}", ia, ib, mid, lo, hi))
    step = statistics.median(inter["b"])
    report.notes.append(
        f"train: time added per step inside the hooks = {ia - ib:.3f} ms = {(ia - ib) / step:.1%} of the median "
        f"step ({step:.2f} ms); the whole-step ratio adds Lightning's dispatch of the callbacks' other hooks and "
        "the logger's writer thread")
    control = [x / y for x, y in zip(per["gradclip, no logging"], per["builtin"])]
    report.notes.append(
        f"train: separate runs: the control (ClipByGlobalNorm with no logger vs gradient_clip_val: the same "
        f"work) ranged {min(control):.2f}-{max(control):.2f} over {len(control)} rounds; builtin runs took "
        f"{min(per['builtin']):.1f}-{max(per['builtin']):.1f} ms per step")


def interleaved(args: argparse.Namespace, timer: Timer, device: torch.device, data: Tensor,
                clip_cls: Any, logger_cls: Any) -> dict[str, list[float]]:
    """One training run whose optimizer steps alternate between the two ways of clipping.

    Steps 2k and 2k+1 form a pair (their order alternates: a b b a a b ...). At an "a" step the
    gradclip callback (``ClipByGlobalNorm`` with per-group norms, logging to the logger) is in
    ``trainer.callbacks``, so Lightning dispatches every hook of theirs as in a real run; at a "b" step
    they are taken out and this callback runs what ``Trainer(gradient_clip_val=...)`` runs,
    ``LightningModule.clip_gradients(optimizer, max_norm, "norm")``, logging nothing. Adjacent steps
    share the process state (memory layout, thread pools, caches), which on a shared VM moves whole
    runs by +-20%: pairing neighbouring steps removes that. The per-step figure is the time between
    successive batch starts.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    class Alternate(Callback):
        """Puts the gradclip callbacks in ``trainer.callbacks`` for the "a" steps only (Lightning reads
        the list at every hook; this callback is first, so the change reaches the rest of the hook)."""

        def __init__(self) -> None:
            self.cbs = [clip_cls(args.max_norm)]
            self.kinds: list[str] = []
            self.starts: list[float] = []
            self.inside: list[float] = []  # time inside the clipping (and monitoring, logging) code, per step
            for cb in self.cbs:  # time inside the gradclip hooks that do per-step work (the last writes the metrics)
                cb.on_before_optimizer_step = self._timed(cb.on_before_optimizer_step)
                cb.on_train_batch_end = self._timed(cb.on_train_batch_end)

        def _timed(self, hook: Callable) -> Callable:
            def timed(*a: Any, **k: Any) -> None:
                timer.sync()
                t0 = timer.now()
                hook(*a, **k)
                timer.sync()
                self.inside[-1] += timer.now() - t0

            return timed

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.others = [cb for cb in trainer.callbacks if cb is not self and cb not in self.cbs]  # Lightning's own

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            timer.sync()
            self.starts.append(timer.now())
            self.inside.append(0.0)
            pair, second = divmod(batch_idx, 2)
            self.kinds.append("ab"[(pair + second) % 2])
            trainer.callbacks[:] = [self, *self.others] + (self.cbs if self.kinds[-1] == "a" else [])

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            timer.sync()
            self.starts.append(timer.now())

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if self.kinds[-1] == "b":  # what Trainer(gradient_clip_val=...) runs, via configure_gradient_clipping
                timer.sync()
                t0 = timer.now()
                pl_module.clip_gradients(optimizer, gradient_clip_val=args.max_norm, gradient_clip_algorithm="norm")
                timer.sync()
                self.inside[-1] += timer.now() - t0

    steps = data.shape[0] // args.lm_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.lm_batch)
    a: list[float] = []
    b: list[float] = []
    ratios: list[float] = []
    in_a: list[float] = []
    in_b: list[float] = []
    for _ in range(args.train_rounds):
        alt = Alternate()
        torch.manual_seed(0)
        tmp = tempfile.mkdtemp(prefix="gradclip-bench-")
        trainer = pl.Trainer(
            default_root_dir=tmp, accelerator=device.type, devices=1, max_steps=steps, log_every_n_steps=1,
            precision=args.precision, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[alt, *alt.cbs], logger=logger_cls(tmp, name="bench"),
        )  # fmt: skip
        trainer.fit(make_tiny_lm(args, False), loader)
        durations = [y - x for x, y in zip(alt.starts, alt.starts[1:])]
        first = args.train_warmup_steps + args.train_warmup_steps % 2  # whole pairs after the warm-up
        for n in range(first, len(durations) - 1, 2):
            (k1, t1), (k2, t2) = (alt.kinds[n], durations[n]), (alt.kinds[n + 1], durations[n + 1])
            ta, tb = (t1, t2) if k1 == "a" else (t2, t1)
            ia, ib = (alt.inside[n], alt.inside[n + 1]) if k1 == "a" else (alt.inside[n + 1], alt.inside[n])
            in_a.append(ia * 1e3)
            in_b.append(ib * 1e3)
            a.append(ta * 1e3)
            b.append(tb * 1e3)
            ratios.append(ta / tb)
    return {"a": a, "b": b, "ratios": ratios, "inside_a": in_a, "inside_b": in_b}


# --------------------------------------------------------------------------------------------- section: adaptive


class ReferenceAutoClip:
    """The AutoClip paper's published loop (Seetharaman et al. 2020, github.com/pseeth/autoclip):
    one ``.item()`` per parameter, ``np.percentile`` over a Python list, then ``clip_grad_norm_``."""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, model: nn.Module) -> None:
        import numpy as np

        total = 0.0
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.data.norm(2).item() ** 2
        self.history.append(total**0.5)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(np.percentile(self.history, self.percentile)))


def reference_agc(parameters: list[nn.Parameter], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """timm's ``timm.utils.agc.adaptive_clip_grad`` (Brock et al. 2021), as published: a loop over parameters."""

    def unitwise_norm(x: Tensor) -> Tensor:
        return x.norm(2.0) if x.ndim <= 1 else x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g_data, clipped_grad))


class ReferenceZClip:
    """Used only when the ``zclip`` package is not installed: its ``ZClip.step`` loop (zscore mode,
    adaptive scaling), with its host reads: ``.item()`` of the norm, then Python-float statistics."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float = 1.0, eps: float = 1e-6,
                 warmup_steps: int = 25) -> None:
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps, self.warmup = alpha, z_thresh, max_grad_norm, eps, warmup_steps
        self.buffer: list[float] = []
        self.mean: Optional[float] = None
        self.var = 0.0

    def step(self, model: nn.Module) -> float:
        norms = [p.grad.norm(2) for p in model.parameters() if p.grad is not None]
        total = torch.stack(norms).pow(2).sum().sqrt().item()
        if self.mean is None:
            self.buffer.append(total)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            return total
        std = self.var**0.5
        z = (total - self.mean) / (std + self.eps)
        clip = self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None
        effective = min(clip if clip is not None else total, self.max_grad_norm)
        if total > effective:
            coef = effective / (total + 1e-6)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.data.mul_(coef)
        x = clip if clip is not None else total
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return total


def section_adaptive(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device) -> None:
    from gradclip_plugin.callbacks import adaptive

    zclip_src = "zclip package (ZClipLightningCallback's hook body: `self.zclip.step(pl_module)`)"
    try:
        from zclip import ZClip as PackageZClip
    except ImportError:
        PackageZClip = ReferenceZClip  # noqa: N806
        zclip_src = "re-implemented zclip ZClip.step (package not installed)"
    try:
        from autoclip.torch import QuantileClip
    except ImportError:
        QuantileClip = None  # noqa: N806
    report.notes.append(f"adaptive: ZClip reference = {zclip_src}")
    for label, make_model, make_loader in step_models(args):
        print(f"[adaptive] {label}; ZClip vs {zclip_src}", flush=True)
        run_in_step(args, device, functools.partial(_adaptive_body, args, report, timer, label, adaptive,
                                                    PackageZClip, QuantileClip),
                    logger=False, model=make_model(), loader=make_loader())


def _adaptive_body(args: argparse.Namespace, report: Report, timer: Timer, label: str, adaptive: Any,
                   PackageZClip: Any, QuantileClip: Any,  # noqa: N803
                   trainer: Any, pl_module: Any, optimizer: Any) -> None:
    params = list(pl_module.parameters())
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    def ours(cls_name: str, **kwargs: Any) -> Callable[[], None]:
        cb = getattr(adaptive, cls_name)(**kwargs)
        prepare(cb, trainer, pl_module)
        return lambda: cb.on_before_optimizer_step(trainer, pl_module, optimizer)

    def compare(a: Callable, b: Callable, what: str, case: str, prime: int = 0,
                target: Optional[float] = None) -> None:
        for _ in range(prime):  # e.g. ZClip's warm-up: measure the steady state after it
            restore()
            a()
            restore()
            b()
        r = paired(timer, a, b, args.reps, args.warmup, before=restore)
        report.add(Row("adaptive", what, case, *r, target=target))

    zkw = dict(alpha=0.97, z_thresh=2.5, eps=1e-6, warmup_steps=25)
    ref_z = PackageZClip(max_grad_norm=1.0, **zkw)
    compare(ours("ZClip", max_norm=1.0, **zkw), lambda: ref_z.step(pl_module),
            "ZClip vs zclip.ZClip.step", f"{label}, after warm-up", prime=zkw["warmup_steps"] + 1, target=1.0)

    if QuantileClip is not None:
        qc = QuantileClip(params, quantile=0.1, history_length=10**9, global_threshold=True)
        compare(ours("AutoClip", percentile=10.0), qc.step,
                "AutoClip vs autoclip QuantileClip(global_threshold=True).step", label, target=1.0)
    else:
        report.skipped.append("adaptive: autoclip package not installed")
    ref_a = ReferenceAutoClip(10.0)
    compare(ours("AutoClip", percentile=10.0), lambda: ref_a(pl_module),
            "AutoClip vs the paper's reference loop (re-implemented)", label)
    compare(ours("AdaptiveGradientClipping", clip_factor=0.01, eps=1e-3), lambda: reference_agc(params),
            "AdaptiveGradientClipping vs timm adaptive_clip_grad loop (re-implemented)", label)
    restore()


# --------------------------------------------------------------------------------------------- section: scaling


def make_many_tensor_module(n: int, size: int):
    """A LightningModule of ``n`` parameters of ``size`` float32 each whose gradient is the weight itself."""
    import pytorch_lightning as pl

    class ManyTensors(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.weights = nn.ParameterList(nn.Parameter(torch.randn(size, generator=g)) for _ in range(n))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return 0.5 * sum((p * p).sum() for p in self.parameters())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return ManyTensors()


def section_scaling(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device) -> None:
    from gradclip_plugin import ClipByGlobalNorm

    def loader() -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=1)

    for n in args.scaling_tensors:
        print(f"[scaling] {n} tensors of {args.scaling_size} float32", flush=True)
        run_in_step(args, device, functools.partial(_scaling_body, args, report, timer, device, n, ClipByGlobalNorm),
                    logger=null_logger(), model=make_many_tensor_module(n, args.scaling_size), loader=loader())


def _scaling_body(args: argparse.Namespace, report: Report, timer: Timer, device: torch.device, n: int,
                  ClipByGlobalNorm: Any, trainer: Any, pl_module: Any, optimizer: Any) -> None:  # noqa: N803
    params = list(pl_module.parameters())
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    saved_every = trainer.log_every_n_steps
    trainer.log_every_n_steps = 10**9  # a step that does not log: the hook's per-step cost
    try:
        for policy in ("skip", "ignore"):
            for case, max_norm in (("fires", norm / 4), ("no clip", norm * 4)):
                clip = ClipByGlobalNorm(max_norm, nonfinite=policy)
                prepare(clip, trainer, pl_module)
                diffs: list[float] = []
                r = paired(
                    timer,
                    lambda: clip.on_before_optimizer_step(trainer, pl_module, optimizer),
                    lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
                    args.reps, args.warmup, before=lambda: torch._foreach_copy_(grads, saved), diffs=diffs,
                )
                small = n < 1000
                report.add(Row("scaling", "ClipByGlobalNorm hook vs torch clip_grad_norm_(foreach=True)",
                               f"{n} x {args.scaling_size} float32, nonfinite={policy!r}, {case}", *r,
                               target=None if small else 1.05, diff_ms=statistics.median(diffs),
                               target_ms=0.1 if small else None))
    finally:
        trainer.log_every_n_steps = saved_every
        torch._foreach_copy_(grads, saved)


# --------------------------------------------------------------------------------------------- main


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    import pytorch_lightning as pl

    text = (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"pytorch_lightning {pl.__version__}, Python {platform.python_version()}")
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=None,
                   help="GPT-2-small blocks in the `ops` gradients (12 = 124M parameters); default 12 on CUDA, 2 on CPU")
    p.add_argument("--step-layers", type=int, default=None,
                   help="GPT-2-small blocks in the module of the `monitor`/`adaptive` sections; default: --layers")
    p.add_argument("--vocab", type=int, default=50257, help="rows of the token embedding (GPT-2: 50257)")
    p.add_argument("--step-models", default="gpt2,tinylm",
                   help="modules of the `monitor`/`adaptive` sections: gpt2 (GPT-2-small shapes: few large tensors), "
                        "tinylm (the `train` model: 30 small tensors)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="gradient dtypes of the `ops` section")
    p.add_argument("--reps", type=int, default=21, help="timed pairs per comparison")
    p.add_argument("--warmup", type=int, default=3, help="untimed pairs before them")
    p.add_argument("--target-ops", type=float, default=1.05, help="clip_by_global_norm_ / torch target")
    p.add_argument("--target-train", type=float, default=1.03, help="end-to-end target")
    p.add_argument("--target-monitor-step", type=float, default=1.01,
                   help="training step with the monitor's per-step pass / without it (GPT-2-small shapes; CUDA only)")
    p.add_argument("--max-norm", type=float, default=1.0, help="clipping threshold in the `train` section")
    p.add_argument("--train-rounds", type=int, default=7, help="rounds: one run of each variant, and one run of alternating steps, per round")
    p.add_argument("--train-steps", type=int, default=40, help="timed optimizer steps per run")
    p.add_argument("--train-warmup-steps", type=int, default=5, help="untimed steps at the start of each run")
    p.add_argument("--precision", default=None, help="Trainer precision in `train`; default 32-true on CPU, 16-mixed on CUDA")
    p.add_argument("--logger", default="tensorboard", choices=["tensorboard", "csv"], help="logger of the logging variants")
    p.add_argument("--lm-vocab", type=int, default=512)
    p.add_argument("--lm-dim", type=int, default=128)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--lm-seq", type=int, default=64)
    p.add_argument("--lm-batch", type=int, default=16)
    p.add_argument("--scaling-tensors", default="100,1000,4000", help="tensor counts of the `scaling` section")
    p.add_argument("--scaling-size", type=int, default=4096, help="elements per tensor in the `scaling` section")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall: elapsed time; process: this process's CPU time (CPU only; steadier on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions: checks that it runs, not a measurement")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"`--sections` got unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    args.step_models = [m.strip() for m in args.step_models.split(",") if m.strip()]
    if not args.step_models or set(args.step_models) - {"gpt2", "tinylm"}:
        p.error(f"`--step-models` must name gpt2 and/or tinylm, got {','.join(args.step_models)!r}")
    args.scaling_tensors = [int(n) for n in args.scaling_tensors.split(",") if n.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            p.error(f"`--dtypes` got {d!r}, which is not a torch dtype (e.g. float32, bfloat16, float16)")
    if args.clock == "process" and args.device == "cuda":
        p.error("`--clock process` counts CPU time, which misses GPU work: use `--clock wall` with `--device cuda`")
    if args.device == "cuda" and not cuda:
        p.error("`--device cuda` was given but torch.cuda.is_available() is False")
    if args.quick:
        args.layers = 1 if args.layers is None else args.layers
        args.vocab, args.reps, args.warmup = 4096, 3, 1
        args.train_rounds, args.train_steps, args.train_warmup_steps = 2, 5, 2
    if args.layers is None:
        args.layers = 12 if args.device == "cuda" else 2
    if args.step_layers is None:
        args.step_layers = args.layers
    if args.precision is None:
        args.precision = "16-mixed" if args.device == "cuda" else "32-true"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    device = torch.device(args.device)
    timer = Timer(device, args.clock)
    report = Report()
    load0 = os.getloadavg()
    started = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    print(f"# gradclip_plugin benchmark, {datetime.date.today().isoformat()}")
    print(f"machine: {machine_description(device)}")
    print(f"command: {command}", flush=True)
    if load0[0] > 0.5 * (os.cpu_count() or 1) and args.device == "cpu":
        print(f"warning: load average {load0[0]:.1f} on {os.cpu_count()} cores: other jobs are running. Timings with "
              "several torch threads suffer most; `--threads 1 --clock process` is steadier on a shared machine.",
              flush=True)
    sections = {"ops": section_ops, "monitor": section_monitor, "train": section_train, "adaptive": section_adaptive,
                "scaling": section_scaling}
    for name in SECTIONS:
        if name in args.sections:
            sections[name](args, report, timer, device)
    load1 = os.getloadavg()
    elapsed = time.time() - started

    print()
    print(f"## Results ({datetime.date.today().isoformat()}, {args.device})")
    print()
    print(f"Machine: {machine_description(device)}  ")
    print(f"Command: `{command}`  ")
    resolved = (f"layers={args.layers} (step-layers={args.step_layers}), vocab={args.vocab}, dtypes={','.join(args.dtypes)}, "
                f"reps={args.reps} pairs after {args.warmup} warm-up pairs, train: {args.train_rounds} rounds x "
                f"{args.train_steps} steps, precision={args.precision}, logger={args.logger}, clock={args.clock}, "
                f"threads={torch.get_num_threads()}")
    print(f"Settings: {resolved}  ")
    print(f"Load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f} on {os.cpu_count()} cores; "
          f"wall time {elapsed:.0f} s")
    print()
    print("Ratio = median over paired repetitions of (gradclip_plugin time / reference time), with its 25th-75th "
          "percentiles; below 1 means gradclip_plugin is faster.")
    print()
    print("| section | gradclip_plugin vs reference | case | gradclip ms | reference ms | ratio [p25, p75] | target | |")
    print("|---|---|---|---:|---:|---|---|---|")
    for r in report.rows:
        ratio = f"{r.ratio:.3f} [{r.ratio_lo:.3f}, {r.ratio_hi:.3f}]" + (
            f", A - B {r.diff_ms:+.3f} ms" if r.diff_ms is not None else "")
        print(f"| {r.section} | {r.what} | {r.case} | {r.a_ms:.3f} | {r.b_ms:.3f} | {ratio} | {r.target_text} | {r.verdict} |")
        if r.note:
            report.notes.append(f"{r.section}/{r.case}: {r.what}: {r.note}")
    if report.notes:
        print()
        for n in report.notes:
            print(f"- {n}")
    if report.skipped:
        print()
        for s in report.skipped:
            print(f"- skipped: {s}")
    targeted = [r for r in report.rows if r.target is not None or r.target_ms is not None]
    missed = [r for r in targeted if r.verdict == "MISS"]
    print()
    print(f"Targets: {len(targeted) - len(missed)} of {len(targeted)} met" + (
        "; missed: " + "; ".join(f"{r.what} [{r.case}] {r.ratio:.3f} ({r.target_text})" for r in missed) if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
