"""No host sync in the per-step hooks: reads of tensor values to the host are counted, not timed.

On a GPU every read of a tensor value by Python (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``,
``int(t)``, an ``if`` on a tensor) waits for all queued kernels: a device sync. These tests patch
those methods of ``torch.Tensor`` with counting wrappers that count only while one of the callbacks'
per-step hooks is running (the hook methods are wrapped on the instance), over a short real
``Trainer`` run. Reads made by Lightning itself or by the test are not counted.

What is asserted:

* with ``nonfinite="ignore"``, on steps that do not log: **zero** reads, for the fixed-threshold
  clipping callbacks, AGC and the monitor;
* on logging steps: exactly **one** read per step and callback (all metrics in one batched copy);
* AutoClip and ZClip: exactly **one** read per step whatever the policy, the norm itself, from
  which their statistics (Python floats, as in their reference implementations) are updated; their
  metrics are then all on the host, and a logging step reads nothing more;
* with ``nonfinite`` = ``"skip"``, ``"error"`` or ``"zero"``: exactly **one** read per step, of the
  norm itself (``.item()``). Whether the optimizer step happens (skip), raises (error) or needs a
  second pass (zero) is a decision Python has to take before ``optimizer.step()``, so it needs to
  know on the host whether the norm is finite: one scalar read, the cost of these policies. The
  callbacks read the norm rather than a flag, and use it (no scaling where the threshold is not
  exceeded, adaptive statistics in Python floats), so that no other read follows. Under a
  ``16-mixed`` loss scaler the scaler takes that decision (it already reads ``found_inf`` itself)
  and the callbacks add none; ``"ignore"`` (torch's behaviour) needs none.

A canary test inserts an ``.item()`` into a callback and checks that the counter sees it.
On a GPU, ``test_cuda_sync_debug_mode`` checks the same with ``torch.cuda.set_sync_debug_mode("error")``,
which also catches syncs that Python does not see (``.cpu()``, ``nonzero``, a boolean mask).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any, Callable

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

from gradclip_plugin import ClipByGlobalNorm, ClipByNorm, ClipByValue
from gradclip_plugin.functional import (
    clip_by_global_norm,
    clip_by_global_norm_,
    clip_by_norm,
    clip_by_norm_,
    clip_by_value,
    clip_by_value_,
    global_norm,
    tensor_norms,
)
from helpers import TinyModel, make_loader, make_trainer

#: ``torch.Tensor`` methods through which Python reads tensor values (each one a sync on CUDA).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__")
#: the Lightning hooks that run at every training step.
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
STEPS = 5

pytestmark = pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval")


class HostReadCounter:
    """Counts host reads (by method name) made while ``active`` is above zero."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.active = 0
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)

            def wrapper(t: torch.Tensor, *args: Any, _orig: Callable = orig, _name: str = name, **kwargs: Any) -> Any:
                if self.active:
                    self.counts[_name] += 1
                return _orig(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def counting(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.active += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.active -= 1

        return wrapped


def watch_hooks(counter: HostReadCounter, cb: Callback) -> Counter[str]:
    """Wrap every per-step hook that ``cb`` overrides so that it counts; return the hook call counts."""
    calls: Counter[str] = Counter()
    for hook in PER_STEP_HOOKS:
        if getattr(type(cb), hook) is getattr(Callback, hook):
            continue
        bound = counter.counting(getattr(cb, hook))

        def hook_fn(*args: Any, _bound: Callable = bound, _hook: str = hook, **kwargs: Any) -> Any:
            calls[_hook] += 1
            return _bound(*args, **kwargs)

        setattr(cb, hook, hook_fn)  # Lightning calls `getattr(callback, hook_name)`: the instance attribute
    return calls


def monitor_factory(**kwargs: Any) -> Callable[[], Callback]:
    def make() -> Callback:
        mod = pytest.importorskip("gradclip_plugin.callbacks.monitor")
        return mod.GradientNormMonitor(**kwargs)

    return make


def adaptive_factory(name: str, **kwargs: Any) -> Callable[..., Callback]:
    def make(**more: Any) -> Callback:
        mod = pytest.importorskip("gradclip_plugin.callbacks.adaptive")
        if not hasattr(mod, name):
            pytest.skip(f"gradclip_plugin.callbacks.adaptive has no {name} yet")
        return getattr(mod, name)(**kwargs, **more)

    return make


#: the rules that read nothing with nonfinite="ignore"
FIXED: dict[str, Callable[..., Callback]] = {
    "ClipByValue": lambda **kw: ClipByValue(0.5, **kw),
    "ClipByNorm": lambda **kw: ClipByNorm(1.0, **kw),
    "ClipByGlobalNorm": lambda **kw: ClipByGlobalNorm(1.0, **kw),
    "ClipByGlobalNorm-inf": lambda **kw: ClipByGlobalNorm(1.0, norm_type=float("inf"), **kw),
    "ClipByGlobalNorm-groups": lambda **kw: ClipByGlobalNorm(1.0, group_depth=1, **kw),
    "AdaptiveGradientClipping": adaptive_factory("AdaptiveGradientClipping"),
}
#: the rules whose statistics are Python floats from the norm, read every step
HISTORY: dict[str, Callable[..., Callback]] = {
    "AutoClip": adaptive_factory("AutoClip", percentile=10.0),
    "AutoClip-history": adaptive_factory("AutoClip", percentile=50.0, history_size=3),
    "ZClip": adaptive_factory("ZClip", warmup_steps=2),  # past its warm-up within the run
    "ZClip-percentile": adaptive_factory("ZClip", warmup_steps=2, mode="percentile", max_norm=None),
}
CLIPPERS = {**FIXED, **HISTORY}


class FusedAdamModel(TinyModel):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)


class SpikyFusedModel(FusedAdamModel):
    """Non-finite gradients at step 1, a loss 1e6 times larger at step 3: a skip and a skip_above."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * {1: float("inf"), 3: 1e6}.get(self.global_step, 1.0)


def run(tmp_path, cb: Callback, counter: HostReadCounter, log_every_n_steps: int, model=None) -> Counter[str]:
    calls = watch_hooks(counter, cb)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=STEPS, logger=CSVLogger(tmp_path), log_every_n_steps=log_every_n_steps
    )
    trainer.fit(model if model is not None else TinyModel(), make_loader(n=4 * STEPS))
    assert trainer.global_step == STEPS
    assert calls["on_before_optimizer_step"] == STEPS, "the hook under test did not run at every step"
    return calls


# ------------------------------------------------------------------------------------ the counter itself


def test_counter_sees_an_inserted_read(tmp_path, monkeypatch):
    """The canary: one ``.item()`` added to a callback's per-step work is seen at every step."""

    class ReadsTheNorm(ClipByGlobalNorm):
        def measure(self, grads):
            norms, aux = super().measure(grads)
            norms.sum().item()  # the kind of line these tests exist to catch
            return norms, aux

    counter = HostReadCounter(monkeypatch)
    run(tmp_path, ReadsTheNorm(1.0, nonfinite="ignore"), counter, log_every_n_steps=1000)
    assert counter.counts == Counter(item=STEPS)


@pytest.mark.parametrize("read", [lambda t: t.item(), lambda t: t.tolist(), bool, float, int, lambda t: f"{t:.3f}",
                                  lambda t: [0, 1][t], lambda t: t.numpy()],
                         ids=["item", "tolist", "bool", "float", "int", "format", "index", "numpy"])
def test_counter_counts_each_kind_of_read_only_when_active(monkeypatch, read):
    counter = HostReadCounter(monkeypatch)
    t = torch.tensor(1)
    read(t)
    assert sum(counter.counts.values()) == 0
    counter.counting(read)(t)
    assert sum(counter.counts.values()) >= 1


# ------------------------------------------------------------------------------------ functional ops


def test_functional_ops_read_nothing(monkeypatch):
    counter = HostReadCounter(monkeypatch)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).bfloat16(), torch.randn(2, 2, generator=g).half()]

    def everything() -> None:
        for norm_type in (1.0, 2.0, 3.0, float("inf")):
            global_norm(tensors, norm_type)
            tensor_norms(tensors, norm_type)
            clip_by_global_norm_(tensors, 0.5, norm_type)
            clip_by_norm_(tensors, 0.5, norm_type)
        clip_by_global_norm_(tensors, torch.tensor(0.25))  # a device tensor threshold
        clip_by_value_(tensors, 0.1)
        clip_by_global_norm(tensors, 0.5)
        clip_by_norm(tensors[0], 0.5, axes=[1])
        clip_by_value(tensors[0], -0.1, 0.1)

    counter.counting(everything)()
    assert counter.counts == Counter()


# ------------------------------------------------------------------------------------ callbacks


@pytest.mark.parametrize("name", list(FIXED))
def test_clipping_callbacks_read_nothing_on_non_logging_steps(tmp_path, monkeypatch, name):
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, CLIPPERS[name](nonfinite="ignore"), counter, log_every_n_steps=1000)
    assert counter.counts == Counter(), f"{name} read tensor values on steps that do not log"


@pytest.mark.parametrize("kwargs", [{}, {"group_depth": "parameter"}, {"norm_type": float("inf")}], ids=["auto", "parameter", "inf"])
def test_monitor_reads_nothing_on_non_logging_steps(tmp_path, monkeypatch, kwargs):
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, monitor_factory(**kwargs)(), counter, log_every_n_steps=1000)
    assert counter.counts == Counter()


@pytest.mark.parametrize("name", list(FIXED) + ["GradientNormMonitor"])
def test_logging_steps_read_once(tmp_path, monkeypatch, name):
    """Every metric of a step (norms, threshold, clip rate, counts) reaches the host in one copy."""
    cb = monitor_factory()() if name == "GradientNormMonitor" else CLIPPERS[name](nonfinite="ignore")
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, cb, counter, log_every_n_steps=1)
    assert sum(counter.counts.values()) == STEPS, f"{name}: {dict(counter.counts)} over {STEPS} logging steps"


@pytest.mark.parametrize("policy", ["skip", "error", "zero"])
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_nonfinite_policies_read_the_norm_once_per_step(tmp_path, monkeypatch, name, policy):
    """``skip``/``error``/``zero`` decide on the host whether the step goes ahead: one read of the norm per step."""
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, CLIPPERS[name](nonfinite=policy), counter, log_every_n_steps=1000)
    assert counter.counts == Counter(item=STEPS)


@pytest.mark.parametrize("name", [n for n in FIXED if n != "ClipByValue"] + ["skip_above"])
def test_a_fused_optimizer_skips_with_no_host_read(tmp_path, monkeypatch, name):
    """The default `skip` with an optimizer that takes `found_inf` (fused Adam, AdamW, SGD): decided on the
    device, nothing read on steps that do not log; `skip_above` likewise."""
    cb = ClipByGlobalNorm(1.0, skip_above=1e4) if name == "skip_above" else FIXED[name]()
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, cb, counter, log_every_n_steps=1000, model=SpikyFusedModel())  # warned at a logging step: none here
    assert counter.counts == Counter(), f"{name} read tensor values with a fused optimizer"
    tally = cb.state_dict()["tallies"][0]
    assert tally["steps"] - tally["finite"] == 1 and tally["skipped"] == (name == "skip_above")


@pytest.mark.parametrize("log_every_n_steps", [1, 1000])
@pytest.mark.parametrize("policy", ["skip", "ignore"])
@pytest.mark.parametrize("name", list(HISTORY))
def test_history_rules_read_the_norm_once_per_step_and_nothing_more(tmp_path, monkeypatch, name, policy, log_every_n_steps):
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, HISTORY[name](nonfinite=policy), counter, log_every_n_steps=log_every_n_steps)
    assert counter.counts == Counter(item=STEPS)


@pytest.mark.parametrize("name", list(FIXED))
def test_nonfinite_policies_on_logging_steps_read_at_most_twice(tmp_path, monkeypatch, name):
    """The norm, then the step's other metrics that are still on the device in one batched copy (none
    when the host already holds them all, as an adaptive rule's statistics on an unclipped step)."""
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, CLIPPERS[name](nonfinite="skip"), counter, log_every_n_steps=1)
    assert counter.counts["item"] == STEPS and counter.counts["tolist"] <= STEPS, dict(counter.counts)
    assert set(counter.counts) <= {"item", "tolist"}, dict(counter.counts)


# ------------------------------------------------------------------------------------ CUDA


def fit_with_no_sync_in_the_hook(tmp_path, cb, model) -> Any:
    """Fit ``model`` on CUDA with ``cb``'s hook under ``set_sync_debug_mode("error")``: any sync in it raises."""
    hook = cb.on_before_optimizer_step

    def strict(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return hook(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    cb.on_before_optimizer_step = strict
    trainer = make_trainer(
        tmp_path, [cb], max_steps=STEPS, accelerator="cuda", logger=CSVLogger(tmp_path), log_every_n_steps=1000
    )
    trainer.fit(model, make_loader(n=4 * STEPS))
    return trainer


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(FIXED) + ["GradientNormMonitor"])
def test_cuda_sync_debug_mode(tmp_path, name):
    """On a GPU, the hooks run under ``set_sync_debug_mode("error")``: any sync raises."""
    cb = monitor_factory()() if name == "GradientNormMonitor" else CLIPPERS[name](nonfinite="ignore")
    assert fit_with_no_sync_in_the_hook(tmp_path, cb, TinyModel()).global_step == STEPS


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("skip_above", [None, 1e4])
def test_cuda_sync_debug_mode_over_the_fused_skip(tmp_path, skip_above):
    """The default `skip` with a fused optimizer on a GPU: no sync in the hook, a skipped step included."""
    cb = ClipByGlobalNorm(1.0, skip_above=skip_above)
    fit_with_no_sync_in_the_hook(tmp_path, cb, SpikyFusedModel())
    tally = cb.state_dict()["tallies"][0]
    assert tally["steps"] - tally["finite"] == 1


def test_skip_spikes_with_a_fused_optimizer_reads_nothing(tmp_path, monkeypatch):
    """SkipSpikes with a fused optimizer: its windows and decisions stay on the device, a NaN step and a
    loss spike included (the rows of the skipped steps are read at the end, outside the step's hooks)."""
    from gradclip_plugin import SkipSpikes

    cb = SkipSpikes(window=2, sigma=3.0)
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, cb, counter, log_every_n_steps=1000, model=SpikyFusedModel())
    assert counter.counts == Counter(), "SkipSpikes read tensor values with a fused optimizer"
    assert [(s.global_step, math.isfinite(s.norm)) for s in cb.skipped] == [(1, False), (3, True)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sync_debug_mode_over_skip_spikes(tmp_path):
    from gradclip_plugin import SkipSpikes

    cb = SkipSpikes(window=2, sigma=3.0)
    fit_with_no_sync_in_the_hook(tmp_path, cb, SpikyFusedModel())
    assert [s.global_step for s in cb.skipped] == [1, 3]


def test_skip_spikes_reads_its_rows_with_the_metrics_on_logging_steps(tmp_path, monkeypatch):
    """The rows of the steps it may have skipped ride in the logging steps' one copy: none is read on a
    step that does not log while fewer than `PENDING` wait."""
    from gradclip_plugin import SkipSpikes
    from gradclip_plugin.callbacks import spikes

    monkeypatch.setattr(spikes, "PENDING", 3)  # more than a logging interval's rows
    cb = SkipSpikes(window=2, sigma=3.0)
    counter = HostReadCounter(monkeypatch)
    run(tmp_path, cb, counter, log_every_n_steps=2, model=SpikyFusedModel())
    assert counter.counts == Counter(tolist=2), "one copy per logging step (steps 1 and 3), nothing else"
    assert [(s.global_step, math.isfinite(s.norm)) for s in cb.skipped] == [(1, False), (3, True)]
