"""What every clipping callback shares: parameter selection, the non-finite policy, metrics, state.

A subclass implements two methods, following "measure, then clip":

* ``measure(grads)`` returns the pre-clip total norm (a 0-dim tensor) and whatever the rule needs
  again to clip (per-tensor norms, say), from one pass over the gradients;
* ``clip_(grads, params, measured)`` clips the gradients in place and returns a :class:`ClipStats`
  computed from the same numbers, with no second pass.

Everything runs on the gradients' device. With ``nonfinite="ignore"``, or under a loss scaler, the
base class reads values back to the host only on logging steps (one batched copy). The
``skip``/``error``/``zero`` policies decide the step's fate on the host, so they read one number
per optimizer step: the norm itself (``step.norm``). Having it, the rules use it: a fixed threshold
that is not exceeded scales nothing, and the adaptive rules keep their statistics in Python floats,
with no kernel for them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import math
import weakref
from typing import Any, Literal, NamedTuple, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics.aggregation import SumMetric

from gradclip_plugin.functional import tensor_norms
from gradclip_plugin.functional.adaptive import Value
from gradclip_plugin.functional.distributed import sharded_over

NonFinitePolicy = Literal["skip", "error", "zero", "ignore"]
#: a norm order: any positive number, or ``inf`` (``"inf"`` in YAML, which LightningCLI passes as a string)
NormType = Union[float, Literal["inf"]]
_POLICIES = ("skip", "error", "zero", "ignore")


class ClipStats(NamedTuple):
    """What one clipping step reports: 0-dim tensors on the gradients' device, or Python numbers
    where the host knows them (``step.norm`` was read)."""

    norm: Value  #: pre-clip norm of the selected gradients
    norm_clipped: Value  #: post-clip norm, derived from the same measurement
    threshold: Value  #: the threshold in force at this step
    clipped: Union[bool, Tensor]  #: whether clipping changed the gradients


class StepInfo(NamedTuple):
    """The optimizer step being clipped, set by the base class before ``clip_`` runs."""

    idx: int  #: index of the optimizer in ``trainer.optimizers`` (keys per-optimizer state)
    optimizer: Any  #: the optimizer about to step
    #: whether the first measured norm was finite (before ``zero``): a Python bool where the host read
    #: it (the ``skip``/``error``/``zero`` policies without a loss scaler), else a bool 0-dim tensor
    finite: Union[bool, Tensor]
    #: the measured norm (after ``zero``) as a Python float where the host read it, else ``None``
    norm: Optional[float] = None


class MeasuredNorms(NamedTuple):
    """Per-tensor gradient norms taken by a ``GradientNormMonitor``, for the clipping callback after it."""

    key: tuple[int, int]  #: (trainer.global_step, optimizer index) of the step they were taken at
    norm_type: float
    grads: list[Any]  #: weak references to the gradients measured, in order
    versions: tuple[int, ...]  #: their version counters then (any in-place change bumps them)
    norms: Tensor  #: 1-D, one norm per gradient

    def norms_for(self, key: tuple[int, int], norm_type: float, grads: list[Tensor]) -> Optional[Tensor]:
        """``norms`` if they are the ``norm_type``-norms of exactly ``grads``, unchanged since, at step ``key``."""
        same = (
            key == self.key
            and norm_type == self.norm_type
            and len(grads) == len(self.grads)
            and all(r() is g and g._version == v for r, g, v in zip(self.grads, grads, self.versions))
        )
        return self.norms if same else None


def measured_norms(key: tuple[int, int], norm_type: float, grads: list[Tensor], norms: Tensor) -> MeasuredNorms:
    return MeasuredNorms(key, norm_type, [weakref.ref(g) for g in grads], tuple(g._version for g in grads), norms)


def preceding_monitor(trainer: pl.Trainer, callback: Callback) -> Optional[Any]:
    """The ``GradientNormMonitor`` whose ``on_before_optimizer_step`` runs right before ``callback``'s.

    Callbacks in between that do not override the hook run no code there; any other one (which
    might change the gradients) makes the answer ``None``.
    """
    from gradclip_plugin.callbacks.monitor import GradientNormMonitor

    callbacks = list(trainer.callbacks)
    at = next((i for i, cb in enumerate(callbacks) if cb is callback), 0)
    for cb in reversed(callbacks[:at]):
        if isinstance(cb, GradientNormMonitor):
            return cb
        if type(cb).on_before_optimizer_step is not Callback.on_before_optimizer_step:
            return None
    return None


def _total(metric: SumMetric) -> Value:
    """A count's value: ``compute()``, or 0 with no kernel for one not updated since its reset."""
    return metric.compute() if metric.update_count else 0.0


def check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive finite number (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def _check_patterns(name: str, patterns: Any) -> list[str]:
    if patterns is None:
        return []
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{name}` must be a list of fnmatch patterns such as ['encoder.*'], got {patterns!r}")
    return list(patterns)


def should_log(trainer: pl.Trainer) -> bool:
    """Whether this optimizer step is one whose metrics Lightning writes (``log_every_n_steps``).

    Uses the logger connector's private ``should_update_logs``, as Lightning's own
    ``LearningRateMonitor`` does: there is no public equivalent, so it is isolated here.
    """
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def metric_key(prefix: str, name: str, idx: int, trainer: pl.Trainer) -> str:
    """``<prefix>/<name>``, or ``<prefix>/opt<i>/<name>`` when the Trainer has several optimizers."""
    return f"{prefix}/opt{idx}/{name}" if len(trainer.optimizers) > 1 else f"{prefix}/{name}"


# Metrics written by the gradclip callbacks during a batch, per Trainer: {logger step: [(keys, values)]}.
# They reach the loggers together at the batch's end (`flush_metrics`): one device-to-host copy and one
# logger call (one TensorBoard event) for all of a step's callbacks and optimizers, however many log.
_pending: weakref.WeakKeyDictionary[pl.Trainer, dict[int, list[tuple[list[str], Any]]]] = weakref.WeakKeyDictionary()


def write_metrics(trainer: pl.Trainer, keys: list[str], values: Union[Tensor, list[Value]], step: int) -> None:
    """Log ``values`` under ``keys`` at ``step`` (a 1-D tensor, or numbers and 0-dim tensors), at the end of
    the batch with every other gradclip metric (see :func:`flush_metrics`). Nothing is read here."""
    _pending.setdefault(trainer, {}).setdefault(step, []).append((keys, values))


def flush_metrics(trainer: pl.Trainer) -> None:
    """Write the metrics pending for ``trainer``: the device values read in one copy, one call per logger and step."""
    from gradclip_plugin.tensorboard import log_scalars

    pending = _pending.pop(trainer, None)
    if not pending:
        return
    # each value: a float, or a slice of one 1-D tensor gathering every device value (one copy for all)
    parts: list[Tensor] = []
    for entries in pending.values():
        for _, values in entries:
            parts += [values] if isinstance(values, Tensor) else [v for v in values if isinstance(v, Tensor)]
    read = iter(())
    if parts:
        device = parts[0].device
        read = iter(torch.cat([p.reshape(-1).to(device) for p in parts]).tolist())  # to the widest float dtype
    for step, entries in pending.items():
        metrics: dict[str, float] = {}
        for keys, values in entries:
            if isinstance(values, Tensor):
                metrics.update((k, next(read)) for k in keys)
            else:
                metrics.update((k, next(read) if isinstance(v, Tensor) else float(v)) for k, v in zip(keys, values))
        for logger in trainer.loggers:
            if not log_scalars(logger, metrics, step):  # a TensorBoardLogger: one event for all of them
                logger.log_metrics(metrics, step=step)


class MetricWriter(Callback):
    """A callback whose metrics, queued by :func:`write_metrics` during a batch, are written at its end.

    Every gradclip callback flushes whatever is queued for the Trainer (the first to run writes it
    all). If the batch raises, what it measured is written too: often what explains the failure.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        flush_metrics(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flush_metrics(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # the values can fail to read for the same reason (a device error): then they are dropped,
        # and the training's own exception is the one raised
        with contextlib.suppress(Exception):
            flush_metrics(trainer)


def log_step(trainer: pl.Trainer) -> int:
    """The step index Lightning's loggers use for this batch (``LearningRateMonitor``'s choice)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def loss_scaler(trainer: pl.Trainer) -> Optional[torch.amp.GradScaler]:
    """The precision plugin's enabled loss scaler (``16-mixed``), or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def flat_shard_group(trainer: pl.Trainer) -> Optional[Any]:
    """The process group FSDP1 (``FSDPStrategy``) shards flat parameters over, or ``None``.

    Under FSDP1 a gradient is this rank's piece of a flat parameter, a plain tensor: the norms
    must be reduced over this group. FSDP2 gradients are DTensors and need no help.
    """
    from pytorch_lightning.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    model = trainer.strategy.model
    if not isinstance(model, FullyShardedDataParallel) or model.sharding_strategy == ShardingStrategy.NO_SHARD:
        return None
    return model.process_group


def selects(name: Optional[str], include: list[str], exclude: list[str]) -> bool:
    """Whether a parameter name passes the ``include``/``exclude`` fnmatch patterns.

    A parameter the module does not name is selected only when no ``include`` pattern restricts the set.
    """
    if name is None:
        return not include
    if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return False
    return not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


def check_include(owner: str, include: list[str], pl_module: pl.LightningModule) -> None:
    """Raise ``MisconfigurationException`` naming an ``include`` pattern that matches no parameter."""
    names = [n for n, _ in pl_module.named_parameters()]
    for pat in include:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise MisconfigurationException(
                f"{owner}: the `include` pattern {pat!r} matches no parameter of "
                f"{type(pl_module).__name__}; names look like {names[:3]}"
            )


def gradient_pairs(params: list[Tensor], shard_group: Optional[Any]) -> list[tuple[Tensor, Tensor]]:
    """``(param, grad)`` for the parameters that have a gradient.

    Under FSDP1 (``shard_group`` set) a rank holding no piece of a parameter has an empty parameter
    and no gradient: it gets an empty gradient, so that the tensor lists, hence the collectives
    that reduce their norms, stay aligned across ranks.
    """
    if shard_group is None:
        return [(p, p.grad) for p in params if p.grad is not None]
    return [
        (p, p.grad if p.grad is not None else torch.zeros_like(p))
        for p in params
        if p.grad is not None or p.numel() == 0
    ]


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    for i, opt in enumerate(trainer.optimizers):
        if opt is optimizer:
            return i
    return 0


class GradientClipCallback(MetricWriter):
    """Base class of the clipping callbacks; not used on its own.

    Args:
        include: fnmatch patterns on ``named_parameters()`` names; only matching parameters are
            clipped and counted. ``None`` selects every parameter.
        exclude: fnmatch patterns of parameters left alone (neither clipped nor counted).
        nonfinite: what to do when the selected gradients hold inf or NaN: ``"skip"`` the optimizer
            step (weights and optimizer state untouched), raise an ``"error"``, ``"zero"`` the
            non-finite entries then clip, or ``"ignore"`` (torch's behaviour: unsafe, NaN reaches
            the weights). Under a ``16-mixed`` loss scaler the scaler skips such steps itself.
        log_prefix: prefix of the logged metric names.
    """

    metric_names = ("norm", "norm_clipped", "threshold", "clip_rate", "nonfinite_steps")

    def __init__(
        self,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        log_prefix: str = "grad_clip",
    ) -> None:
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        if nonfinite not in _POLICIES:
            raise ValueError(f"`nonfinite` must be one of {list(_POLICIES)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}")
        self.log_prefix = log_prefix
        self._key_prefix = log_prefix
        self._selected: dict[int, bool] = {}  # id(param) -> selected?
        self._names: dict[int, str] = {}  # id(param) -> name
        # per optimizer, on the gradients' device: clipped finite steps and finite steps since the last
        # log (their ratio is the clip rate), and the running count of non-finite steps
        self._clipped_steps: dict[int, SumMetric] = {}
        self._finite_steps: dict[int, SumMetric] = {}
        self._nonfinite_steps: dict[int, SumMetric] = {}
        self._steps_since_log: dict[int, int] = {}  # host-known: steps counted in the two above
        # finite steps since the last log that the host read as finite (not counted in _finite_steps)
        self._known_finite_steps: dict[int, int] = {}
        self._warned_nonfinite = False
        self._shard_group: Optional[Any] = None  # FSDP1's, set in on_fit_start
        self._norm_source: Optional[Any] = None  # a GradientNormMonitor right before this callback
        self._step_key = (-1, -1)  # (global step, optimizer index) of the step being clipped
        self.step: Optional[StepInfo] = None  # the step in progress, for ``clip_``/``extra_metrics``
        self._constants: dict[tuple[float, torch.device, torch.dtype], Tensor] = {}  # see `constant_like`

    # ------------------------------------------------------------------ to implement
    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        """Return the pre-clip total norm (0-dim) and what ``clip_`` needs, from one pass."""
        raise NotImplementedError

    def clip_(self, grads: list[Tensor], params: list[Tensor], measured: tuple[Tensor, Any]) -> ClipStats:
        """Clip ``grads`` in place using ``measured``; update adaptive state; return the stats."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def state_key(self) -> str:
        """Class name, init arguments and metric prefix: two instances keep separate checkpoint entries.

        Built from the ``__init__`` signature (not ``vars(self)``: Lightning attaches ``log`` bound to
        the model), so the key does not depend on the model.
        """
        # Lightning reads state_key on every hook call (profiler names): build it once per prefix.
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != self._key_prefix:
            names = sorted(inspect.signature(type(self).__init__).parameters.keys() - {"self", "args", "kwargs"})
            key = {k: getattr(self, k) for k in names if hasattr(self, k)}
            state_key = self._generate_state_key(key_prefix=self._key_prefix, **key)
            cached = self._state_key_cache = (self._key_prefix, state_key)
        return cached[1]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"{type(self).__name__} clips the gradients itself, but `Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val})` is also set and Lightning would clip them a second time. "
                "Remove `gradient_clip_val` from the Trainer."
            )
        from pytorch_lightning.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                f"{type(self).__name__} cannot clip under DeepSpeed: the engine partitions the gradients "
                "and steps them itself. Use DeepSpeed's own `gradient_clipping` setting instead."
            )
        self._assign_key_prefix(trainer)
        if any(True for _ in pl_module.parameters()):
            check_include(type(self).__name__, self.include, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # again: `configure_model` may have created the parameters since `setup`
        check_include(type(self).__name__, self.include, pl_module)
        self._shard_group = flat_shard_group(trainer)  # the strategy has wrapped the model by now
        self._norm_source = preceding_monitor(trainer, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from gradclip_plugin.tensorboard import write_layout

        write_layout(trainer)  # one chart layout for all gradclip callbacks; no-op without TensorBoard

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Under FSDP1 every norm below is reduced over the shard group, so all ranks see the
        # norms of the full gradients and take the same decisions.
        with sharded_over(self._shard_group):
            self._clip_step(trainer, pl_module, optimizer)

    def _clip_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pairs = gradient_pairs(self._selected_params(pl_module, optimizer), self._shard_group)
        if not pairs:
            return
        params, grads = [p for p, _ in pairs], [g for _, g in pairs]
        idx = optimizer_index(trainer, optimizer)
        scaler = loss_scaler(trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise MisconfigurationException(
                f"{type(self).__name__} cannot clip for `{type(optimizer).__name__}` under a loss scaler: this "
                "optimizer unscales inside `step()` (e.g. `fused=True`), so the gradients it sees here are still "
                "scaled by the loss scale. Use `fused=False`, or `precision='bf16-mixed'` which needs no scaler."
            )
        self._step_key = (trainer.global_step, idx)
        device = grads[0].device
        measured = self.measure(grads)
        counter = self._count(self._nonfinite_steps, idx, device)
        # `finite`: whether the first measured norm is finite, for the statistics; `counted`: whether the
        # norm clipped against is (after `zero`), for the clip rate
        finite: Union[bool, Tensor]
        norm: Optional[float] = None
        if scaler is not None or self.nonfinite == "ignore":
            # sync-free: the host does not know; under a scaler the scaler skips the step. Count on the device.
            finite = counted = torch.isfinite(measured[0])
            counter.update(~finite)
        elif math.isfinite(norm := measured[0].item()):  # the one host read of a step: the norm itself
            finite = counted = True
        else:
            finite = False
            counter.update(self.constant_like(1.0, measured[0]))
            if self.nonfinite == "error":
                bad = [self._names.get(id(p), "?") for p, g in pairs if not torch.isfinite(g).all()]
                raise RuntimeError(
                    f"{type(self).__name__}: non-finite gradients at global step {trainer.global_step} in {bad}. "
                    "Set `nonfinite='skip'` to skip such steps, or find the source (learning rate, loss, data)."
                )
            if self.nonfinite == "skip":
                self._warn_nonfinite("skipping the optimizer step")
                self.skip_step(optimizer)
                if should_log(trainer):
                    self._log(trainer, idx, None)
                return
            self._warn_nonfinite("zeroing the non-finite entries")
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            measured = self.measure(grads)
            norm = measured[0].item()  # a second read, at such a step only
            counted = math.isfinite(norm)  # zeroed, the squares can still overflow
        self.step = StepInfo(idx, optimizer, finite, norm)
        stats = self.clip_(grads, params, measured)
        # counts, not a weighted MeanMetric: with nan_strategy="disable" torchmetrics ignores weights
        clipped_steps = self._count(self._clipped_steps, idx, device)
        if isinstance(counted, Tensor):
            clipped_steps.update(stats.clipped & counted)
            self._count(self._finite_steps, idx, device).update(counted)
        elif counted:  # known on the host: a host count, and an update only where a step was clipped
            self._known_finite_steps[idx] = self._known_finite_steps.get(idx, 0) + 1
            if isinstance(stats.clipped, Tensor):
                clipped_steps.update(stats.clipped)
            elif stats.clipped:
                clipped_steps.update(self.constant_like(1.0, measured[0]))
        self._steps_since_log[idx] = self._steps_since_log.get(idx, 0) + 1
        if should_log(trainer):
            self._log(trainer, idx, stats)

    def state_dict(self) -> dict[str, Any]:
        # The clip-rate counts since the last log are kept too, so that the first rate logged after a
        # resume in the middle of a logging interval still covers the whole interval.
        return {
            "nonfinite_steps": {i: float(_total(m)) for i, m in self._nonfinite_steps.items()},
            "clip_rate": {
                i: (float(_total(self._clipped_steps[i])), float(self._finite_count(i)), n)
                for i, n in self._steps_since_log.items()
                if n
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        cpu = torch.device("cpu")
        for i, count in state_dict.get("nonfinite_steps", {}).items():
            self._restart(self._count(self._nonfinite_steps, int(i), cpu), count)
        for i, (clipped, finite, steps) in state_dict.get("clip_rate", {}).items():
            self._restart(self._count(self._clipped_steps, int(i), cpu), clipped)
            self._restart(self._count(self._finite_steps, int(i), cpu), finite)
            self._known_finite_steps[int(i)] = 0
            self._steps_since_log[int(i)] = int(steps)

    # ------------------------------------------------------------------ helpers
    def tensor_norms(self, grads: list[Tensor], norm_type: float) -> Tensor:
        """``tensor_norms(grads, norm_type)`` for ``measure``: on a step where the ``GradientNormMonitor``
        right before this callback measured these very gradients (same tensors, unchanged since, same
        ``norm_type``), its numbers, so that monitoring and clipping share one pass."""
        measured = self._norm_source.measured if self._norm_source is not None else None
        norms = measured.norms_for(self._step_key, norm_type, grads) if measured is not None else None
        return norms if norms is not None else tensor_norms(grads, norm_type)

    def constant_like(self, value: float, like: Tensor) -> Tensor:
        """``value`` as a 0-dim tensor like ``like``, made once (not a fill kernel every step); read only."""
        key = (value, like.device, like.dtype)
        cached = self._constants.get(key)
        if cached is None:
            cached = self._constants[key] = torch.full_like(like, value)
        return cached

    def unclipped(self, norm: Tensor, threshold: float) -> Optional[ClipStats]:
        """The stats of a step that changes nothing, if the host knows it is one: the norm it read (of
        the same order as the fixed ``threshold``) is at most ``threshold``; ``None`` otherwise."""
        read = self.read_norm
        if read is None or not read <= threshold:
            return None
        return ClipStats(read, read, self.constant_like(threshold, norm), False)

    @property
    def read_norm(self) -> Optional[float]:
        """The step's measured norm as a Python float, where the base class read it (``step.norm``)."""
        return self.step.norm if self.step is not None else None

    def metric_key(self, name: str, idx: int, trainer: pl.Trainer) -> str:
        """This callback's key for metric ``name`` of optimizer ``idx`` (see :func:`metric_key`)."""
        return metric_key(self._key_prefix, name, idx, trainer)

    @staticmethod
    def skip_step(optimizer: torch.optim.Optimizer) -> None:
        """Make the coming ``optimizer.step()`` a no-op: with no gradient, torch optimizers pass
        over a parameter, so weights and optimizer state (Adam's step count) stay untouched."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def extra_metrics(self) -> dict[str, Tensor]:
        """More 0-dim tensors to log for this step (adaptive callbacks); read with the rest."""
        return {}

    def _log(self, trainer: pl.Trainer, idx: int, stats: Optional[ClipStats]) -> None:
        values: dict[str, Value] = {}
        if stats is not None:
            values.update(norm=stats.norm, norm_clipped=stats.norm_clipped, threshold=stats.threshold)
            values.update(self.extra_metrics())
        if self._steps_since_log.get(idx):
            clipped, finite = _total(self._clipped_steps[idx]), self._finite_count(idx)
            # 0 when every step since the last log was non-finite (none could be clipped)
            values["clip_rate"] = clipped / (finite.clamp(min=1) if isinstance(finite, Tensor) else max(finite, 1))
            self._restart(self._clipped_steps[idx])
            if idx in self._finite_steps:
                self._restart(self._finite_steps[idx])
            self._known_finite_steps[idx] = 0
            self._steps_since_log[idx] = 0
        values["nonfinite_steps"] = _total(self._nonfinite_steps[idx])
        keys = [self.metric_key(k, idx, trainer) for k in values]
        write_metrics(trainer, keys, list(values.values()), log_step(trainer))

    def _finite_count(self, idx: int) -> Value:
        """Finite steps since the last log: those counted on the device plus those the host read as finite."""
        known = self._known_finite_steps.get(idx, 0)
        return _total(self._finite_steps[idx]) + known if idx in self._finite_steps else known

    @classmethod
    def _count(cls, store: dict[int, SumMetric], idx: int, device: torch.device) -> SumMetric:
        """The count ``store[idx]`` on ``device``, created at 0.

        ``nan_strategy="disable"``: the default NaN check reads a value back to the host.
        ``sync_on_compute=False``: every rank takes the same decisions (they follow from reduced
        norms), so the counts are equal on all ranks and a sum across ranks would multiply them.
        """
        metric = store.get(idx)
        if metric is None:
            metric = store[idx] = SumMetric(nan_strategy="disable", sync_on_compute=False).to(device)
        elif metric.device != device:
            metric.to(device)
        return metric

    @staticmethod
    def _restart(metric: SumMetric, value: float = 0.0) -> None:
        """Reset a count to ``value``."""
        metric.reset()
        if value:
            metric.update(torch.full((), float(value), device=metric.device))

    def _warn_nonfinite(self, action: str) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"{type(self).__name__}: non-finite gradients found, {action} (nonfinite={self.nonfinite!r}). "
                f"Such steps are counted in `{self._key_prefix}/nonfinite_steps`; this warning is shown once."
            )

    def _selected_params(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if any(id(p) not in self._selected for p in params):
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
            for p in params:
                name = self._names.get(id(p))
                self._selected[id(p)] = selects(name, self.include, self.exclude)
        return [p for p in params if self._selected[id(p)]]

    def _assign_key_prefix(self, trainer: pl.Trainer) -> None:
        """Keep metric names distinct when several clipping callbacks share a prefix."""
        same = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipCallback) and cb.log_prefix == self.log_prefix]
        if len(same) < 2:
            self._key_prefix = self.log_prefix
            return
        kinds = [type(cb).__name__ for cb in same]
        name = type(self).__name__
        k = sum(1 for cb in same[: same.index(self)] if type(cb) is type(self))
        suffix = name if kinds.count(name) == 1 else f"{name}{k}"
        self._key_prefix = f"{self.log_prefix}/{suffix}"
