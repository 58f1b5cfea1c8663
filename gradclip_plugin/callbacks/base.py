"""What every gradclip callback shares, and the clipping pipeline of one optimizer step.

A clipping callback follows one optimizer step's gradients in ``on_before_optimizer_step``:

1. **select**: the optimizer's parameters that pass ``include``/``exclude`` (resolved once per fit,
   :class:`Plan`) and have a gradient;
2. **measure**: the rule's ``measure(grads)`` gives one norm per gradient, in one fused pass; they
   combine into the step's total norm;
3. **policy**: with ``nonfinite="skip"``/``"error"``/``"zero"`` the total norm is read to the host
   (the one read of a step), and a non-finite one is acted on; with ``"ignore"``, or under a loss
   scaler (which skips such steps itself), nothing is read; with ``"skip"`` and an optimizer that
   takes a ``found_inf`` (:func:`takes_found_inf`), the step is skipped on the device, unread;
4. **clip**: the rule's ``clip_(grads, params, step)`` scales the gradients in place and returns the
   step's :class:`ClipStats`, computed from the same numbers;
5. **tally**: the step is added to the optimizer's :class:`Tally` (Python numbers where the host knows
   them, device tensors where it does not: the same arithmetic either way);
6. **log**: at the end of the batch, on logging steps, each tally becomes the metrics ``norm``,
   ``norm_clipped``, ``threshold`` (of the last step), ``clip_rate`` (over every step since the last
   log) and ``nonfinite_steps``, read in one device-to-host copy and written to every logger.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin import tensorboard
from gradclip_plugin.callbacks import _lightning as L
from gradclip_plugin.functional import combine_norms, subset_norms, tensor_norms

NonFinitePolicy = Literal["skip", "error", "zero", "ignore"]
#: a norm order: any positive number, or ``inf`` (``"inf"`` in YAML, which LightningCLI passes as a string)
NormType = Union[float, Literal["inf"]]
#: how parameters are grouped for per-group norms (see :func:`group_of`)
GroupDepth = Union[int, Literal["auto", "parameter"]]
#: a number the host knows, or a 0-dim tensor that stays on the device until the metrics are read
Value = Union[float, int, bool, Tensor]

#: ``group_depth="auto"`` keeps at most this many groups (unless depth 1 already has more)
AUTO_MAX_GROUPS = 10
#: norm orders whose norms of loss-scaled gradients can be divided by the scale: the powers of the scale
#: in the others' sums overflow float32 (65536 ** 8 alone does), so their gradients are unscaled first
EXACT_UNDER_SCALE = (1.0, 2.0, math.inf)
_GRAD = operator.attrgetter("grad")


# ---------------------------------------------------------------------------------------------- validation
def check_patterns(name: str, patterns: Any) -> list[str]:
    """``patterns`` as a list of fnmatch patterns (``[]`` for ``None``), or ``ValueError`` naming ``name``."""
    if patterns is None:
        return []
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{name}` must be a list of fnmatch patterns such as ['encoder.*'], got {patterns!r}")
    return list(patterns)


def check_group_depth(group_depth: Any, allow_none: bool = False) -> None:
    if group_depth is None and allow_none:
        return
    if group_depth not in ("auto", "parameter") and (
        isinstance(group_depth, bool) or not isinstance(group_depth, int) or group_depth < 1
    ):
        raise ValueError(f"`group_depth` must be a positive int, 'auto' or 'parameter', got {group_depth!r}")


# ---------------------------------------------------------------------------------------------- groups
def group_of(name: str, depth: Union[int, Literal["parameter"]]) -> str:
    """The group of parameter ``name``: its module path cut at ``depth``, or the name itself.

    ``group_of("encoder.layers.0.weight", 2) == "encoder.layers"``. A parameter that belongs to no
    submodule (``"scale"`` on the LightningModule itself) is its own group.
    """
    path = name.split(".")[:-1]
    return name if depth == "parameter" or not path else ".".join(path[:depth])


def auto_depth(names: list[str], max_groups: int = AUTO_MAX_GROUPS) -> int:
    """The depth giving the most groups not above ``max_groups`` (the smallest such depth; at least 1)."""
    deepest = max((n.count(".") for n in names), default=1)
    best, best_count = 1, len({group_of(n, 1) for n in names})
    for depth in range(2, deepest + 1):
        count = len({group_of(n, depth) for n in names})
        if count > max_groups:
            break
        if count > best_count:
            best, best_count = depth, count
    return best


class Plan(NamedTuple):
    """Which of an optimizer's parameters a callback takes, and their groups: resolved once per fit."""

    size: int  #: how many parameters the optimizer had (one added later, e.g. by fine-tuning, re-plans)
    params: list[Tensor]  #: the selected parameters, in the optimizer's order
    names: list[str]  #: their names in the module (``"?"`` for one the module does not name)
    groups: list[int]  #: the group of each, an index into ``group_names``
    group_names: list[str]


def plan_params(
    params: list[Tensor], named: dict[int, str], include: list[str], exclude: list[str], depth: Any
) -> Plan:
    """The :class:`Plan` for ``params`` given the module's names (``id(param) -> name``).

    A parameter passes when its name matches an ``include`` pattern (any, if there are none) and no
    ``exclude`` pattern; one the module does not name passes only when ``include`` is empty.
    """
    chosen, names, groups, group_names = [], [], [], []
    for p in params:
        name = named.get(id(p))
        if name is None:
            if include:
                continue
        elif (include and not any(fnmatch.fnmatchcase(name, pat) for pat in include)) or any(
            fnmatch.fnmatchcase(name, pat) for pat in exclude
        ):
            continue
        group = "unnamed" if name is None or depth is None else group_of(name, depth)
        if group not in group_names:
            group_names.append(group)
        chosen.append(p)
        names.append("?" if name is None else name)
        groups.append(group_names.index(group))
    return Plan(len(params), chosen, names, groups, group_names)


def takes_found_inf(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> bool:
    """Whether ``optimizer.step()`` obeys a device-side ``optimizer.found_inf`` (1: no change at all), as
    torch's fused Adam, AdamW and SGD do for ``GradScaler``.

    Not a fused SGD with momentum before its first step: torch makes its momentum buffers with
    ``empty_like`` and a skipped step leaves them uninitialised (later steps would read garbage).
    """
    if not (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and optimizer.defaults.get("fused")):
        return False
    if isinstance(optimizer, torch.optim.SGD) and any(group["momentum"] for group in optimizer.param_groups):
        return any("momentum_buffer" in optimizer.state.get(p, ()) for p in params)  # the first, once stepped
    return True


def read_metrics(metrics: dict[str, Value]) -> dict[str, float]:
    """``metrics`` with Python float values, every tensor among them read in one device-to-host copy."""
    return dict(zip(metrics, read_values(list(metrics.values()))))


def read_values(values: list[Value]) -> list[float]:
    """``values`` as Python floats: every tensor among them read in one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    read = iter(torch.cat([t.reshape(-1).to(device, wide) for t in tensors]).tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


# ---------------------------------------------------------------------------------------------- shared base
class GradientCallback(*L.CALLBACK_BASES):  # type: ignore[misc]
    """What the clipping callbacks and :class:`GradientNormMonitor` share: selection, names, writing.

    Subclasses fill :meth:`metrics` (the values to write at the end of a logging batch) and
    :meth:`charts` (what they log, for the TensorBoard layout).
    """

    def __init__(
        self,
        *,
        include: Optional[list[str]],
        exclude: Optional[list[str]],
        group_depth: Optional[GroupDepth],
        log_prefix: str,
    ) -> None:
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        check_group_depth(group_depth, allow_none=True)
        self.group_depth = group_depth
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}")
        self.log_prefix = log_prefix
        self.key_prefix = log_prefix  #: the prefix of the metric names (see ``setup``)
        # Lightning checks at `Trainer(...)` that state keys are unique, before any hook runs: until
        # `setup` settles the key, it is unique to this instance
        self._state_key = self.make_state_key(instance=id(self))
        self._reset()

    def make_state_key(self, **more: Any) -> str:
        """The class name and ``log_prefix`` (and ``more``), in the form of Lightning's own state keys."""
        return f"{type(self).__qualname__}{ {'log_prefix': self.log_prefix, **more}!r}"

    @property
    def state_key(self) -> str:
        """The class name and ``log_prefix``, plus a position when several clipping callbacks of one class
        share the prefix (as ``EarlyStopping`` keys on ``monitor`` and ``mode``): a threshold changed, or
        a callback added, on resume does not orphan the saved state."""
        return self._state_key

    def _reset(self) -> None:
        """Forget everything tied to a fit (called at each fit's ``setup``)."""
        for handle in getattr(self, "_hooks", {}).values():
            handle.remove()
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> its step post-hook, calling `after_step`
        self._plans: dict[int, Plan] = {}  # id(optimizer) -> its plan
        self._members: dict[tuple[int, ...], Tensor] = {}  # group rows of the gradients present
        self._shard_group: Optional[Any] = None
        self._n_optimizers = 1
        self._loop_index: dict[int, int] = {}  # id(optimizer) -> index, in a loop without a Trainer

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._reset()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after `configure_model` and the strategy's wrapping: the parameters and the shard group are final
        try:
            self.check_include(pl_module)
        except ValueError as err:
            raise L.misconfiguration(trainer, str(err)) from None
        self._shard_group = L.flat_shard_group(trainer)
        self._n_optimizers = len(trainer.optimizers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # one layout for all gradclip callbacks, written by the first of them
        ours = [cb for cb in trainer.callbacks if isinstance(cb, GradientCallback)]
        if ours[:1] != [self] or not trainer.is_global_zero:
            return
        charts: dict[str, tuple[str, list[str]]] = {}
        for cb in ours:  # a title two callbacks share (`clip_rate`) is one chart of both
            for title, (kind, names) in cb.charts(self._n_optimizers).items():
                charts.setdefault(title, (kind, []))[1].extend(names)
        for writer, tag_prefix in L.tensorboard_writers(trainer):
            tensorboard.write_layout(writer, charts, tag_prefix)
            for cb in ours:
                cb.describe(writer, tag_prefix)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if L.should_log(trainer):
            self._write(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # the raising batch's numbers often explain the failure; a device error can make them unreadable too
        try:
            self._write(trainer)
        except Exception:  # noqa: S110 - the training's own exception is the one to raise
            pass

    # ------------------------------------------------------------------ for subclasses
    def metrics(self, idx: Optional[int] = None) -> dict[str, Value]:
        """The values to log at the end of a logging batch (of optimizer ``idx`` only, if given), by
        metric name; forgets them."""
        raise NotImplementedError

    def charts(self, n_optimizers: int) -> dict[str, tuple[str, list[str]]]:
        """What this callback logs, for the TensorBoard layout: ``{chart title: (kind, [metric names])}``
        (see :func:`gradclip_plugin.tensorboard.write_layout`)."""
        return {}

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Have :meth:`after_step` called right after each ``optimizer.step()`` (one hook per optimizer)."""
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(lambda opt, *_: self.after_step(opt))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs right after the step of an optimizer this callback :meth:`watch` es."""

    def written(self, values: dict[str, float]) -> None:
        """Called with the metrics once they are read (the first moment the host knows them)."""

    def describe(self, writer: Any, tag_prefix: str = "") -> None:
        """Write what this callback is to a TensorBoard ``SummaryWriter`` (for ``gradclip report``)."""

    def metric_key(self, name: str, idx: int, n_optimizers: Optional[int] = None) -> str:
        """``<prefix>/<name>``, or ``<prefix>/opt<idx>/<name>`` when there are several optimizers."""
        n = self._n_optimizers if n_optimizers is None else n_optimizers
        return f"{self.key_prefix}/opt{idx}/{name}" if n > 1 else f"{self.key_prefix}/{name}"

    def check_include(self, module: torch.nn.Module) -> None:
        """Raise ``ValueError`` naming an ``include`` pattern that matches no parameter of ``module``."""
        names = [n for n, _ in module.named_parameters()]
        for pat in self.include:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(
                    f"{type(self).__name__}: the `include` pattern {pat!r} matches no parameter of "
                    f"{type(module).__name__}; names look like {names[:3]}"
                )

    def plan(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> Plan:
        """This callback's :class:`Plan` for ``optimizer`` in this fit, made at its first step from ``module``'s
        parameter names (and again if the optimizer gains parameters)."""
        size = sum(len(group["params"]) for group in optimizer.param_groups)
        plan = self._plans.get(id(optimizer))
        if plan is None or plan.size != size:
            named = {id(p): n for n, p in module.named_parameters()}
            params = [p for group in optimizer.param_groups for p in group["params"]]
            depth = auto_depth(list(named.values())) if self.group_depth == "auto" else self.group_depth
            plan = self._plans[id(optimizer)] = plan_params(params, named, self.include, self.exclude, depth)
        return plan

    def gradients(self, plan: Plan) -> tuple[list[Tensor], list[Tensor], Sequence[int]]:
        """``(params, grads, positions)`` of the planned parameters that have a gradient.

        Under FSDP1 a rank holding no piece of a parameter has an empty parameter and no gradient: it
        gets an empty gradient, so that the tensor lists, hence the collectives that reduce their
        norms, stay aligned across ranks.
        """
        grads = list(map(_GRAD, plan.params))
        if not any(map(operator.is_, grads, itertools.repeat(None))):  # the usual case: a gradient for each
            return plan.params, grads, range(len(grads))
        flat = self._shard_group is not None
        keep = [i for i, (p, g) in enumerate(zip(plan.params, grads)) if g is not None or (flat and p.numel() == 0)]
        params = [plan.params[i] for i in keep]
        return params, [g if (g := grads[i]) is not None else torch.zeros_like(p) for i, p in zip(keep, params)], keep

    def group_norms(self, plan: Plan, positions: list[int], norms: Tensor, norm_type: float) -> dict[str, Tensor]:
        """``{group name: norm}`` of the gradients at ``positions`` of ``plan``, from their per-tensor ``norms``."""
        groups = tuple(plan.groups[i] for i in positions)
        present = sorted(set(groups))
        members = self._members.get(groups)
        if members is None or members.device != norms.device:  # a host-to-device copy, once per layout
            rows = [[g == k for g in groups] for k in present]
            members = self._members[groups] = torch.tensor(rows, dtype=torch.bool, device=norms.device)
        return dict(zip((plan.group_names[k] for k in present), subset_norms(norms, members, norm_type).unbind()))

    def loop_step(self, module: Any, optimizer: Any, fabric: Any) -> tuple[Any, Plan, int, Any]:
        """For a loop without a Trainer (Fabric, plain PyTorch): the user's optimizer, its plan and index (in
        the order the optimizers come), and Fabric's loss scaler, the gradients unscaled."""
        self._shard_group = L.loop_shard_group(fabric, module)
        module, optimizer = L.unwrap(module), L.unwrap(optimizer)
        if id(optimizer) not in self._plans:
            self.check_include(module)
        idx = self._loop_index.setdefault(id(optimizer), len(self._loop_index))
        return optimizer, self.plan(optimizer, module), idx, L.loop_scaler(fabric, optimizer)

    def _write(self, trainer: Any) -> None:
        metrics = self.metrics()
        if metrics and trainer.is_global_zero:
            # a non-finite value is left out: a chart cannot draw it (TensorBoard would repeat the last
            # finite one); `nonfinite_steps` counts such steps
            values = {k: v for k, v in read_metrics(metrics).items() if math.isfinite(v)}
            self.written(values)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=L.log_step(trainer))


# ---------------------------------------------------------------------------------------------- clipping
class ClipStats(NamedTuple):
    """What one clipping step reports: Python numbers the host knows, or 0-dim tensors on the device."""

    norm: Value  #: pre-clip norm of the selected gradients
    norm_clipped: Value  #: post-clip norm, derived from the same measurement
    threshold: Value  #: the threshold in force at this step
    clipped: Union[bool, Tensor]  #: whether clipping changed the gradients
    extra: Optional[dict[str, Value]] = None  #: more metrics of the rule (ZClip's ``z``)
    skip: bool = False  #: the rule asks to skip this optimizer step (ZClip's ``skip_step_z_thresh``)


class Step(NamedTuple):
    """One optimizer step as a rule's ``clip_`` sees it (all of it measured by the base class)."""

    idx: int  #: the optimizer's index (keys per-optimizer state)
    norms: Tensor  #: per-tensor norms of the gradients, of the rule's order (from ``measure``)
    norm: Tensor  #: their total, 0-dim
    host: Optional[float]  #: ``norm`` read to the host, where it was read (else ``None``)
    sample: bool = True  #: whether ``norm`` measures the true gradients (not after ``nonfinite="zero"``)
    extra: Any = None  #: what ``measure`` returned besides the norms (AGC's unit norms)


@dataclass
class Tally:
    """One optimizer's counts over the fit, from which every count that is logged is derived."""

    steps: int = 0  #: optimizer steps
    finite: Value = 0  #: those whose gradients were finite (the others are ``nonfinite_steps``)
    clipped: Value = 0  #: those, among the finite, that clipping changed
    skipped: Value = 0  #: steps the rule skipped (not for non-finite gradients)
    at_log: tuple[int, Value, Value] = (0, 0, 0)  #: ``(steps, finite, clipped)`` at the last log
    last: Optional[ClipStats] = None  #: the last step's numbers (``None`` if it was skipped)
    groups: Optional[dict[str, Tensor]] = None  #: per-group pre-clip norms of the last logging step


class GradientClipCallback(GradientCallback):
    """Base class of the clipping callbacks; not used on its own.

    A rule is a subclass with two methods, "measure, then clip":

    * ``measure(grads)`` returns one norm per gradient (a 1-D tensor of order ``self.norm_type``) and
      anything ``clip_`` needs again, from one pass over the gradients;
    * ``clip_(grads, params, step)`` clips the gradients in place and returns the :class:`ClipStats`.

    Args:
        include: fnmatch patterns on ``named_parameters()`` names; only matching parameters are
            clipped and counted. ``None`` selects every parameter.
        exclude: fnmatch patterns of parameters left alone (neither clipped nor counted).
        nonfinite: what to do when the selected gradients hold inf or NaN: ``"skip"`` the optimizer
            step (its weights and state untouched; other optimizers step as usual), raise an
            ``"error"``, ``"zero"`` the non-finite entries and clip the rest, or ``"ignore"`` (clip as
            torch would, NaN included). Under a ``16-mixed`` loss scaler such steps are the scaler's
            to skip, whatever the policy.
        group_depth: also log the pre-clip norm of each group of parameters,
            ``<log_prefix>/norm/<group>``, on logging steps, from the norms the rule measured anyway
            (groups as in :class:`GradientNormMonitor`); ``None`` for none.
        log_prefix: prefix of the logged metric names.
    """

    #: the order of the norms ``measure`` returns
    norm_type: float = 2.0
    #: whether the rule needs the step's norm on the host (its statistics are Python floats)
    reads_norm: bool = False
    #: whether the rule depends on the gradients' norms only, not their scale (then the scaled gradients
    #: of a fused optimizer under a loss scaler are clipped by their norms divided by the scale, for the
    #: norm orders of ``EXACT_UNDER_SCALE``; other rules and orders unscale the gradients first)
    scale_invariant: bool = True
    #: skip a step whose pre-clip total norm exceeds this (``ClipByNorm``, ``ClipByGlobalNorm``)
    skip_above: Optional[float] = None

    def __init__(
        self,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
    ) -> None:
        if nonfinite not in ("skip", "error", "zero", "ignore"):
            raise ValueError(f"`nonfinite` must be one of ['skip', 'error', 'zero', 'ignore'], got {nonfinite!r}")
        self.nonfinite = nonfinite
        super().__init__(include=include, exclude=exclude, group_depth=group_depth, log_prefix=log_prefix)

    def _reset(self) -> None:
        super()._reset()
        self._tallies: dict[int, Tally] = {}
        self._warned = False
        self._hidden: dict[int, list[tuple[Tensor, Tensor]]] = {}  # id(optimizer) -> gradients hidden for its step
        self._flagged: dict[int, tuple[torch.optim.Optimizer, Tensor]] = {}  # id -> the optimizer and its `found_inf`
        self._on_device = False  # whether a skip was left to the device (then warned about once read)

    # ------------------------------------------------------------------ the rule
    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        """One norm per gradient, of order ``self.norm_type``, and what ``clip_`` needs besides."""
        return tensor_norms(grads, self.norm_type, shard_group=self._shard_group), None

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        """Clip ``grads`` in place from ``step``'s measurement; return the step's numbers."""
        raise NotImplementedError(f"{type(self).__name__} is a base class: use one of its subclasses")

    @property
    def skips_steps(self) -> bool:
        """Whether the rule may skip a step of its own accord (then ``skipped_steps`` is logged)."""
        return self.skip_above is not None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        name = type(self).__name__
        if trainer.gradient_clip_val:
            raise L.misconfiguration(
                trainer,
                f"{name} clips the gradients itself, but `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
                "is also set and Lightning would clip them a second time. Remove `gradient_clip_val` from the Trainer.",
            )
        L.refuse_deepspeed(trainer, name)
        # metric names: `<log_prefix>/...`, or `<log_prefix>/<Class>[k]/...` when clipping callbacks share the prefix
        shared = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipCallback) and cb.log_prefix == self.log_prefix]
        same = [cb for cb in shared if type(cb) is type(self)]
        position = same.index(self) if len(same) > 1 else None
        self._state_key = self.make_state_key(**({} if position is None else {"position": position}))
        self.key_prefix = self.log_prefix
        if len(shared) > 1:
            self.key_prefix = f"{self.log_prefix}/{name}{'' if position is None else position}"

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        plan = self.plan(optimizer, pl_module)
        self.clip_step(optimizer, plan, idx, L.loss_scaler(trainer), L.should_log(trainer), f"global step {trainer.global_step}")

    def clip_gradients(self, module: Any, optimizer: Any, *, fabric: Any = None, metrics: bool = True) -> dict[str, float]:
        """Clip ``module``'s gradients for ``optimizer``'s coming step, in a Fabric or plain PyTorch loop.

        Call it after the backward pass and before ``optimizer.step()``, as ``fabric.clip_gradients``:
        it takes ``optimizer``'s parameters of ``module`` (with ``include``/``exclude``), unscales their
        gradients first under Fabric's loss scaler, applies the rule and the non-finite policy (under
        ``"skip"`` the coming ``optimizer.step()`` leaves this optimizer's parameters and state
        untouched) and advances the statistics, exactly as in a Trainer. Save ``state_dict()`` in your
        checkpoint and restore it with ``load_state_dict()``.

        Args:
            module: the model, or Fabric's wrapper of it.
            optimizer: the optimizer about to step, or Fabric's wrapper of it.
            fabric: the ``Fabric`` the model was set up with, if any (its loss scaler and FSDP).
            metrics: return the metrics (one device-to-host copy); ``False`` returns ``{}`` and reads
                nothing, for steps you do not log: the next call that returns them covers every step since.

        Returns:
            ``{"grad_clip/norm": ..., "grad_clip/norm_clipped": ..., "grad_clip/clip_rate": ..., ...}``,
            the names the callback logs in a Trainer (one optimizer's), ready for ``fabric.log_dict``.
        """
        optimizer, plan, idx, scaler = self.loop_step(module, optimizer, fabric)
        # a plain loop may have a GradScaler of its own, which would overwrite a `found_inf`
        self.clip_step(optimizer, plan, idx, scaler, metrics, device_skip=fabric is not None)
        if not metrics:
            return {}
        values = read_metrics(self.metrics(idx))
        self.written(values)
        return values

    def metrics(self, idx: Optional[int] = None) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for i, t in self._tallies.items():
            steps, finite, clipped = t.at_log
            if t.steps == steps or idx not in (None, i):
                continue  # no step since the last log
            values: dict[str, Value] = {}
            if t.last is not None:
                values.update(norm=t.last.norm, norm_clipped=t.last.norm_clipped, threshold=t.last.threshold)
                values.update(t.last.extra or {})
            # over the finite steps since the last log; 0 if there were none (none could be clipped)
            window = t.finite - finite
            values["clip_rate"] = (t.clipped - clipped) / (window.clamp(min=1) if isinstance(window, Tensor) else max(window, 1))
            values["nonfinite_steps"] = t.steps - t.finite
            if self.skips_steps:
                values["skipped_steps"] = t.skipped
            values.update({f"norm/{g}": n for g, n in (t.groups or {}).items()})
            out.update((self.metric_key(k, i), v) for k, v in values.items())
            t.at_log, t.groups = (t.steps, t.finite, t.clipped), None
        return out

    def charts(self, n_optimizers: int) -> dict[str, tuple[str, list[str]]]:
        # TensorBoard gives every series of a chart its run's colour: one line and a band tell apart
        # what three lines of one colour could not
        out: dict[str, tuple[str, list[str]]] = {"threshold": ("Multiline", []), "clip_rate": ("Multiline", [])}
        for i in range(n_optimizers):
            norm, clipped = (self.metric_key(k, i, n_optimizers) for k in ("norm", "norm_clipped"))
            out[f"{norm[: -len('/norm')]}: post-clip norm (line), and the part clipped off (band)"] = (
                "Margin", [clipped, clipped, norm]
            )
            out["threshold"][1].append(self.metric_key("threshold", i, n_optimizers))
            out["clip_rate"][1].append(self.metric_key("clip_rate", i, n_optimizers))
        return out

    def describe(self, writer: Any, tag_prefix: str = "") -> None:
        writer.add_text(f"{tag_prefix}{self.key_prefix}/callback", type(self).__name__)

    def state_dict(self) -> dict[str, Any]:
        # the counts at the last log too: the first rate logged after a resume in the middle of a
        # logging interval still covers the whole interval
        return {
            "tallies": {
                i: {"steps": t.steps, "finite": int(t.finite), "clipped": int(t.clipped), "skipped": int(t.skipped),
                    "at_log": tuple(int(v) for v in t.at_log)}  # fmt: skip
                for i, t in self._tallies.items()
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, saved in state_dict.get("tallies", {}).items():
            try:
                self._tallies[int(i)] = Tally(**{**saved, "at_log": tuple(saved["at_log"])})
            except (TypeError, KeyError):
                L.rank_zero_warn(f"{type(self).__name__}: the checkpoint's counts for optimizer {i} do not fit; they start afresh.")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def clip_step(
        self,
        optimizer: torch.optim.Optimizer,
        plan: Plan,
        idx: int,
        scaler: Optional[torch.amp.GradScaler],
        log_groups: bool,
        where: str = "",
        device_skip: bool = True,
    ) -> None:
        """Clip the gradients of ``plan``'s parameters for ``optimizer``'s coming step (the pipeline above);
        ``device_skip``: whether ``scaler`` is the only loss scaler there can be (not in a plain loop)."""
        self.restore_hidden()  # gradients hidden for a step that never ran (a loss scaler skipped it)
        params, grads, positions = self.gradients(plan)
        if not grads:
            return
        # a fused optimizer's gradients are still scaled
        scale = L.pending_scale(scaler, optimizer, self.scale_invariant and self.norm_type in EXACT_UNDER_SCALE)
        tally = self._tallies.setdefault(idx, Tally())
        norms, extra = self.measure(grads)
        if scale is not None:
            norms = norms / scale.to(norms.device)  # the true norms; the coefficients apply to the scaled gradients alike
        norm = combine_norms(norms, self.norm_type)
        # The policy acts where there is no loss scaler (the scaler skips such steps itself). A fused
        # optimizer skips a step given `found_inf`, on the device: then nothing is read; otherwise the
        # norm is read to the host (the one read of a step) to decide.
        acts = scaler is None and self.nonfinite != "ignore"
        on_device = acts and device_skip and self.nonfinite == "skip" and not self.reads_norm and takes_found_inf(optimizer, params)
        reads = self.reads_norm or (not on_device and (acts or self.skip_above is not None))
        host = norm.item() if reads else None
        finite: Union[bool, Tensor] = torch.isfinite(norm) if host is None else math.isfinite(host)
        tally.steps += 1
        tally.last, sample = None, True
        if acts and not on_device and not finite:  # known on the host
            if self.nonfinite == "error":
                bad = [plan.names[i] for i, g in zip(positions, grads) if not torch.isfinite(g).all()]
                raise RuntimeError(
                    f"{type(self).__name__}: non-finite gradients at {where or 'this step'} in {bad}. "
                    "Set `nonfinite='skip'` to skip such steps, or find the source (learning rate, loss, data)."
                )
            self._warn_nonfinite("skipping the optimizer step" if self.nonfinite == "skip" else "zeroing the non-finite entries")
            if self.nonfinite == "skip":
                self.skip_step(optimizer)
                return
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            norms, extra = self.measure(grads)
            norm = combine_norms(norms, self.norm_type)
            host, sample = norm.item(), False  # a second read, at such a step only
        if log_groups and self.group_depth is not None:
            tally.groups = self.group_norms(plan, positions, norms, self.norm_type)
        stats = self.clip_(grads, params, Step(idx, norms, norm, host, sample, extra))
        tally.last = stats
        skip = stats.skip
        if self.skip_above is not None:  # a spike too large to clip: the step is skipped
            skip = skip | ((host if host is not None else norm) > self.skip_above)
        if finite is not False:  # a zeroed step stays non-finite: it is not in the clip rate
            tally.finite = tally.finite + finite
            tally.clipped = tally.clipped + (stats.clipped & finite)
            if skip is not False:
                tally.skipped = tally.skipped + (skip & finite)
        if on_device:  # weights, moments and step count stay untouched where it is 1
            flag, other = (~finite | skip).float(), getattr(optimizer, "found_inf", None)  # another callback's
            optimizer.found_inf = flag if other is None else torch.maximum(other, flag)
            self._flagged[id(optimizer)] = (optimizer, optimizer.found_inf)
            self._on_device = True
            self.watch(optimizer)
        elif skip:
            if scale is not None:  # the scaler checks for inf what it unscales: without it, its step and update fail
                scaler.unscale_(optimizer)
            self.skip_step(optimizer)

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the coming ``optimizer.step()`` a no-op for this optimizer alone.

        The gradients are hidden (torch optimizers pass over a parameter without one, so weights and
        state, Adam's step count included, stay untouched) and put back right after that step, by one
        step post-hook per optimizer, so that a parameter shared with another optimizer keeps its
        gradient for that optimizer's step. If the step never runs (a loss scaler skipped it), they go
        back at the next hook or at the end of the batch, as if nothing had been hidden.
        """
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._hidden[id(optimizer)] = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        self.watch(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.restore_hidden(id(optimizer))

    def restore_hidden(self, key: Optional[int] = None) -> None:
        """Undo a skip for the step of optimizer ``id`` ``key`` (of all, if ``None``): put back the hidden
        gradients, and remove the ``found_inf`` given for that step only."""
        for k in list(self._hidden) if key is None else [key]:
            for p, g in self._hidden.pop(k, ()):
                if p.grad is None:
                    p.grad = g
        for k in list(self._flagged) if key is None else [key]:
            optimizer, flag = self._flagged.pop(k, (None, None))
            if optimizer is not None and optimizer.__dict__.get("found_inf") is flag:  # not another's
                del optimizer.found_inf

    def written(self, values: dict[str, float]) -> None:
        # a step skipped on the device (`found_inf`) is first known here, at the next logging step
        if self._on_device and any(v > 0 for k, v in values.items() if k.endswith("/nonfinite_steps")):
            self._warn_nonfinite("skipping the optimizer step")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.restore_hidden()
        super().on_train_batch_end(trainer, pl_module, *args)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.restore_hidden()
            if self._on_device and any(t.steps > int(t.finite) for t in self._tallies.values()):  # no log read it
                self._warn_nonfinite("skipping the optimizer step")

    def _warn_nonfinite(self, action: str) -> None:
        if not self._warned:
            self._warned = True
            L.rank_zero_warn(
                f"{type(self).__name__}: non-finite gradients found, {action} (nonfinite={self.nonfinite!r}). "
                f"Such steps are counted in `{self.key_prefix}/nonfinite_steps`; this warning is shown once."
            )

    def unclipped(self, step: Step, threshold: float) -> Optional[ClipStats]:
        """The numbers of a step that changes nothing, where the host knows it is one: its norm, read
        (of the same order as the fixed ``threshold``), is at most ``threshold``; ``None`` otherwise."""
        if step.host is None or not step.host <= threshold:
            return None
        return ClipStats(step.host, step.host, threshold, False)
