"""What every gradclip callback shares, and the clipping pipeline of one optimizer step.

A clipping callback follows one optimizer step's gradients in ``on_before_optimizer_step``:

1. **select**: the optimizer's parameters that pass ``include``/``exclude`` (resolved once per fit,
   :class:`Plan`) and have a gradient;
2. **measure**: the rule's ``measure(grads)`` gives one norm per gradient, in one fused pass; they
   combine into the step's total norm;
3. **decide**: :func:`~gradclip_plugin.callbacks.step.decide` gives the step's fate from that norm, the
   non-finite policy, ``skip_above``, the loss scaler and the optimizer: run it, skip it on the host,
   skip it on the device (a fused optimizer's ``found_inf``: nothing is read), raise or zero;
4. **clip**: for a step that runs (or may, on the device), the rule's ``clip_(grads, params, step)``
   scales the gradients in place and returns the step's :class:`ClipStats`; a skipped step's
   gradients are never scaled;
5. **count**: the step is added to the optimizer's :class:`Tally` (Python numbers where the host knows
   them, device tensors where it does not: the same arithmetic either way);
6. **log**: at the end of the batch, on logging steps, each tally becomes the metrics ``norm``,
   ``norm_max``, ``norm_clipped``, ``threshold``, ``clip_rate`` and the counts, read in one
   device-to-host copy and written to every logger.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from gradclip_plugin import names, tensorboard
from gradclip_plugin.callbacks import _lightning as lightning
from gradclip_plugin.callbacks.step import Fate, StepGuard, decide, takes_found_inf
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
def check_number(name: str, value: Any, *, allow_none: bool = False, integer: bool = False,
                 valid: Callable[[float], bool] = lambda v: v > 0, what: str = "a positive finite number") -> Any:  # fmt: skip
    """``value`` as a Python number (an ``int`` if ``integer``) for which ``valid`` holds, or ``ValueError``
    naming ``name`` and saying ``what`` it must be. A NumPy scalar or a 0-dim tensor is read once, here."""
    if value is None and allow_none:
        return None
    number = value.item() if hasattr(value, "item") and getattr(value, "shape", None) == () else value
    if isinstance(number, bool) or not isinstance(number, int if integer else (int, float)) or not (math.isfinite(number) and valid(number)):
        raise ValueError(f"`{name}` must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return number if integer else float(number)


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
def parameter_names(module: torch.nn.Module) -> dict[int, str]:
    """``{id(param): name}`` of ``module``'s parameters, without ``torch.compile``'s ``_orig_mod.``."""
    return {id(p): n.replace("_orig_mod.", "") for n, p in module.named_parameters()}


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
    chosen, names_, groups, group_names = [], [], [], []
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
        names_.append("?" if name is None else name)
        groups.append(group_names.index(group))
    return Plan(len(params), chosen, names_, groups, group_names)


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


def _warn_fused_momentum(optimizers: list[torch.optim.Optimizer], scaler: Optional[torch.amp.GradScaler]) -> None:
    """Warn of torch's fused SGD with momentum under a loss scaler: a combination this package cannot make safe."""
    if scaler is not None and any(isinstance(o, torch.optim.SGD) and o.defaults.get("fused") and o.defaults.get("momentum") for o in optimizers):
        lightning.rank_zero_warn(
            "torch's fused SGD with momentum leaves its momentum buffers uninitialised when a loss scaler skips the "
            "first step of a parameter (an overflow then): use `fused=False`, or `foreach=True`, under `16-mixed`."
        )


def _not(value: Union[bool, Tensor]) -> Union[bool, Tensor]:
    return ~value if isinstance(value, Tensor) else not value


def _fmax(a: Value, b: Value) -> Value:
    """The larger of two norms, a NaN counting as none (both NaN: NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.fmax(torch.as_tensor(a), torch.as_tensor(b))
    return b if math.isnan(a) or b > a else a


def _ratio(a: Value, b: Value) -> Value:
    """``a / b``, NaN (not written) for ``0 / 0``."""
    return a / b if isinstance(a, Tensor) or isinstance(b, Tensor) or b else math.nan


def _rule_skip(fate: Fate, stats: ClipStats) -> tuple[Fate, ClipStats]:
    """A rule's request to skip the step made on the device (a tensor ``stats.skip``): into the device flag
    where the step may be skipped there, else read (the host skips it)."""
    if isinstance(stats.skip, Tensor) and fate.action == "device":
        return fate._replace(flag=torch.maximum(fate.flag, stats.skip.float())), stats._replace(skip=False)
    return fate, stats._replace(skip=bool(stats.skip))


def skips(fate: Fate, stats: ClipStats) -> Union[bool, Tensor]:
    """Whether the step is skipped, by the policy or the rule (a 0-dim bool tensor where the device decides)."""
    return fate.flag.bool() if fate.action == "device" else fate.action == "skip" or stats.skip


# ---------------------------------------------------------------------------------------------- shared base
class GradientCallback(*lightning.CALLBACK_BASES):  # type: ignore[misc]
    """What the clipping callbacks and :class:`GradientNormMonitor` share: selection, names, writing.

    Subclasses fill :meth:`_pop_metrics` (the values to write at the end of a logging batch);
    :mod:`gradclip_plugin.tensorboard` charts what they log.
    """

    def __init__(
        self,
        *,
        include: Optional[list[str]],
        exclude: Optional[list[str]],
        group_depth: Optional[GroupDepth],
        log_prefix: str,
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        self.include = check_patterns("include", include)
        self.report_every_n_steps = check_number("report_every_n_steps", report_every_n_steps, allow_none=True, integer=True,
                                                 what="a positive integer")  # fmt: skip
        self.exclude = check_patterns("exclude", exclude)
        check_group_depth(group_depth, allow_none=True)
        self.group_depth = group_depth
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}")
        self.log_prefix = log_prefix
        self._key_prefix = log_prefix  # the prefix of the metric names (see `setup`)
        # Lightning checks at `Trainer(...)` that state keys are unique, before any hook runs: until
        # `setup` settles the key, it is unique to this instance
        self._state_key = self._make_state_key(instance=id(self))
        self._reset()

    def _make_state_key(self, **more: Any) -> str:
        """The class name and ``log_prefix`` (and ``more``), in the form of Lightning's own state keys."""
        return f"{type(self).__qualname__}{ {'log_prefix': self.log_prefix, **more}!r}"

    @property
    def state_key(self) -> str:
        """The class name and ``log_prefix``, plus a position when several clipping callbacks of one class
        share the prefix (as ``EarlyStopping`` keys on ``monitor`` and ``mode``): a threshold changed, or
        a callback added, on resume does not orphan the saved state."""
        return self._state_key

    def _reset(self) -> None:
        """Forget everything tied to a fit (called at each fit's ``setup``). Optimizers key it weakly:
        a new optimizer never finds what belonged to one that is gone."""
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its Plan
        self._loop_index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> index, in a loop
        self._loop_seen: set[int] = set()  # the indices handed out in a loop
        self._members: dict[tuple[int, ...], Tensor] = {}  # group rows of the gradients present
        self._shard_group: Optional[Any] = None
        self._n_optimizers = 1
        self._stepped = False  # whether an optimizer stepped in this batch (then it writes, on logging steps)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._reset()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after `configure_model` and the strategy's wrapping: the parameters and the shard group are final
        try:
            self._check_module(pl_module)
        except ValueError as err:
            raise lightning.misconfiguration(trainer, str(err)) from None
        self._shard_group = lightning.flat_shard_group(trainer)
        self._n_optimizers = len(trainer.optimizers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # one layout for all gradclip callbacks, written by the first of them
        ours = [cb for cb in trainer.callbacks if isinstance(cb, GradientCallback)]
        if ours[:1] == [self] and trainer.is_global_zero:
            tensorboard.write_callbacks(lightning.tensorboard_writers(trainer), ours, self._n_optimizers)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        # under gradient accumulation Lightning's logging step spans the window's batches: write once, at
        # the batch that stepped
        if self._stepped and lightning.should_log(trainer):
            self._write(trainer)
        if self._stepped and self.report_every_n_steps and (trainer.global_step % self.report_every_n_steps == 0):
            self._write_figure(trainer)
        self._stepped = False

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if [cb for cb in trainer.callbacks if isinstance(cb, GradientCallback)][:1] == [self]:  # one figure a run
            self._write_figure(trainer)

    def _write_figure(self, trainer: Any) -> None:
        """``gradclip report``'s figure of the run so far in TensorBoard's Images tab (rank zero; matplotlib)."""
        for writer, tag_prefix in lightning.tensorboard_writers(trainer) if trainer.is_global_zero else ():
            if not tensorboard.write_figure(writer, trainer.global_step, tag_prefix):
                lightning.rank_zero_warn(tensorboard.NO_MATPLOTLIB)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # the raising batch's numbers often explain the failure; a device error can make them unreadable too
        try:
            self._write(trainer)
        except Exception:  # noqa: S110 - the training's own exception is the one to raise
            pass

    # ------------------------------------------------------------------ for subclasses
    def _pop_metrics(self, idx: Optional[int] = None) -> dict[str, Value]:
        """The values to log at the end of a logging batch (of optimizer ``idx`` only, if given), by
        metric name; forgets them."""
        raise NotImplementedError

    def _written(self, values: dict[str, float]) -> None:
        """Called with the metrics once they are read (the first moment the host knows them)."""

    def _metric_key(self, name: str, idx: int, n_optimizers: Optional[int] = None) -> str:
        """``<prefix>/<name>``, or ``<prefix>/opt<idx>/<name>`` when there are several optimizers."""
        n = self._n_optimizers if n_optimizers is None else n_optimizers
        return f"{self._key_prefix}/opt{idx}/{name}" if n > 1 else f"{self._key_prefix}/{name}"

    #: the names of the attributes that hold a dict of state per optimizer index (a new optimizer at an index starts afresh)
    _per_optimizer: tuple[str, ...] = ()

    def _check_module(self, module: torch.nn.Module) -> None:
        """Raise ``ValueError`` naming an ``include`` or ``exclude`` pattern that matches no parameter of ``module``."""
        names_ = list(parameter_names(module).values())
        for what, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pat in patterns:
                if not any(fnmatch.fnmatchcase(n, pat) for n in names_):
                    raise ValueError(
                        f"{type(self).__name__}: the `{what}` pattern {pat!r} matches no parameter of "
                        f"{type(module).__name__}; names look like {names_[:3]}"
                    )

    def _plan(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> Plan:
        """This callback's :class:`Plan` for ``optimizer`` in this fit, made at its first step from ``module``'s
        parameter names (and again if the optimizer gains parameters)."""
        size = sum(len(group["params"]) for group in optimizer.param_groups)
        plan = self._plans.get(optimizer)
        if plan is None or plan.size != size:
            named = parameter_names(module)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            depth = auto_depth(list(named.values())) if self.group_depth == "auto" else self.group_depth
            plan = self._plans[optimizer] = plan_params(params, named, self.include, self.exclude, depth)
        return plan

    def _gradients(self, plan: Plan) -> tuple[list[Tensor], list[Tensor], Sequence[int]]:
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

    def _group_norms(self, plan: Plan, positions: Sequence[int], norms: Tensor, norm_type: float) -> dict[str, Tensor]:
        """``{group name: norm}`` of the gradients at ``positions`` of ``plan``, from their per-tensor ``norms``."""
        groups = tuple(plan.groups[i] for i in positions)
        present = sorted(set(groups))
        members = self._members.get(groups)
        if members is None or members.device != norms.device:  # a host-to-device copy, once per layout
            rows = [[g == k for g in groups] for k in present]
            members = self._members[groups] = torch.tensor(rows, dtype=torch.bool, device=norms.device)
        return dict(zip((plan.group_names[k] for k in present), subset_norms(norms, members, norm_type).unbind()))

    def _loop_step(self, module: Any, optimizer: Any, fabric: Any) -> tuple[Any, Plan, int, Any]:
        """For a loop without a Trainer (Fabric, plain PyTorch): the user's optimizer, its plan and index (in
        the order the optimizers come), and Fabric's loss scaler, the gradients unscaled."""
        self._shard_group = lightning.loop_shard_group(fabric, module)
        module, optimizer = lightning.unwrap(module), lightning.unwrap(optimizer)
        if optimizer not in self._plans:
            self._check_module(module)
        idx = self._loop_index.get(optimizer)
        if idx is None:
            idx = self._loop_index[optimizer] = len(self._loop_index)
            if idx in self._loop_seen:  # an index an earlier optimizer had, now gone (a new fold): start afresh
                for name in self._per_optimizer:
                    getattr(self, name).pop(idx, None)
            self._loop_seen.add(idx)
        return optimizer, self._plan(optimizer, module), idx, lightning.loop_scaler(fabric, optimizer)

    def _write(self, trainer: Any) -> None:
        metrics = self._pop_metrics()
        if metrics:  # read on every rank: each takes the same decisions (a run of skips stops them all)
            # a non-finite value is left out: a chart cannot draw it (TensorBoard would repeat the last
            # finite one); `nonfinite_steps` counts such steps
            values = read_metrics(metrics)
            self._written(values)  # takes out what is read under private keys
            values = {k: v for k, v in values.items() if math.isfinite(v)}
            for logger in trainer.loggers if trainer.is_global_zero else ():
                logger.log_metrics(values, step=lightning.log_step(trainer))


# ---------------------------------------------------------------------------------------------- clipping
class ClipStats(NamedTuple):
    """What one clipping step reports: Python numbers the host knows, or 0-dim tensors on the device."""

    norm: Value  #: pre-clip norm of the selected gradients
    norm_clipped: Value  #: post-clip norm, derived from the same measurement
    threshold: Value  #: the threshold in force at this step
    clipped: Union[bool, Tensor]  #: whether clipping changed the gradients
    extra: Optional[dict[str, Value]] = None  #: more metrics of the rule (ZClip's ``z``)
    #: the rule asks to skip this optimizer step (ZClip's ``skip_step_z_thresh``, SkipSpikes: a 0-dim bool
    #: tensor, left to the device where the step may be skipped there); it then leaves the gradients as they are
    skip: Union[bool, Tensor] = False


class Step(NamedTuple):
    """One optimizer step as a rule's ``clip_`` sees it (all of it measured by the base class)."""

    idx: int  #: the optimizer's index (keys per-optimizer state)
    norms: Tensor  #: per-tensor norms of the gradients, of the rule's order (from ``measure``)
    norm: Tensor  #: their total, 0-dim
    host: Optional[float]  #: ``norm`` read to the host, where it was read (else ``None``)
    sample: bool = True  #: whether ``norm`` measures the true gradients (not after ``nonfinite="zero"``)
    extra: Any = None  #: what ``measure`` returned besides the norms (AGC's unit norms)
    #: where the step may be skipped on the device, a 0-dim bool tensor, true where it is: ``norms``,
    #: ``norm`` and a tensor ``extra`` are 0 there (so a coefficient from them is 1), and a rule that
    #: clips from anything else must leave the gradients unchanged where it is true
    skip: Optional[Tensor] = None


@dataclass
class Tally:
    """One optimizer's counts over the fit, from which every count that is logged is derived."""

    steps: int = 0  #: optimizer steps
    finite: Value = 0  #: those whose gradients were finite (the others are ``nonfinite_steps``)
    ran: Value = 0  #: the finite steps that ran (not skipped by the rule): the clip rate's denominator
    clipped: Value = 0  #: those, among the steps that ran, that clipping changed
    skipped: Value = 0  #: finite steps the rule skipped (``skip_above``, ZClip)
    streak: Value = 0  #: steps skipped in a row, up to the last one (non-finite or by the rule)
    since: Value = 0  #: the global step at which that run of skips began
    tripped: Value = -1  #: on the device: where the first run of ``max_consecutive_skips`` skips began (-1: none)
    at_log: tuple[int, Value, Value] = (0, 0, 0)  #: ``(steps, ran, clipped)`` at the last log
    norm_max: Value = math.nan  #: the largest finite pre-clip norm since the last log
    last: Optional[ClipStats] = None  #: the last step's numbers
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
        max_consecutive_skips: stop the fit with an error when this many optimizer steps in a row
            were skipped (non-finite gradients, ``skip_above``, ZClip's skip), as optax's
            ``max_consecutive_errors``; ``None`` never stops. A skip decided on the device is noticed
            at the next logging step.
        group_depth: also log the pre-clip norm of each group of parameters,
            ``<log_prefix>/norm/<group>``, on logging steps, from the norms the rule measured anyway
            (groups as in :class:`GradientNormMonitor`); ``None`` for none.
        log_prefix: prefix of the logged metric names.
        report_every_n_steps: also write ``gradclip report``'s figure of the run to TensorBoard's Images
            tab every this many optimizer steps (it is written at the end of the fit in any case, by
            the first gradclip callback; matplotlib needed); ``None`` for the end only.
    """

    #: the order of the norms ``measure`` returns
    norm_type: float = 2.0
    #: whether the rule needs the step's norm on the host (its statistics are Python floats)
    reads_norm: bool = False
    #: whether the rule depends on the gradients' norms only, not their scale (then the scaled gradients
    #: of a fused optimizer under a loss scaler are clipped by their norms divided by the scale, for the
    #: norm orders of ``EXACT_UNDER_SCALE``; other rules and orders unscale the gradients first)
    scale_invariant: bool = True
    #: whether the rule clips complex gradients (by the modulus, as torch does)
    complex_ok: bool = True
    #: skip a step whose pre-clip total norm exceeds this (``ClipByNorm``, ``ClipByGlobalNorm``)
    skip_above: Optional[float] = None
    #: whether the rule clips (SkipSpikes only skips: no clip rate, no post-clip chart)
    clips: bool = True
    #: whether the rule keeps statistics of one measurement per optimizer step (then ``LBFGS``, whose
    #: closure runs the hook several times a step, is refused)
    per_step_state: bool = False

    def __init__(
        self,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_skips: Optional[int] = 100,
        group_depth: Optional[GroupDepth] = None,
        log_prefix: str = "grad_clip",
        report_every_n_steps: Optional[int] = None,
    ) -> None:
        if nonfinite not in ("skip", "error", "zero", "ignore"):
            raise ValueError(f"`nonfinite` must be one of ['skip', 'error', 'zero', 'ignore'], got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.max_consecutive_skips = check_number("max_consecutive_skips", max_consecutive_skips, allow_none=True, integer=True, what="a positive integer")
        super().__init__(include=include, exclude=exclude, group_depth=group_depth, log_prefix=log_prefix,
                         report_every_n_steps=report_every_n_steps)  # fmt: skip

    def _reset(self) -> None:
        super()._reset()
        self._tallies: dict[int, Tally] = {}
        self._warned = False
        self._guard = StepGuard()  # the skips it made, undone after their step, at the batch's end, on failure
        self._on_device = False  # whether a skip was left to the device (then warned about once read)

    # ------------------------------------------------------------------ the rule
    def measure(self, grads: list[Tensor]) -> tuple[Tensor, Any]:
        """One norm per gradient, of order ``self.norm_type``, and what ``clip_`` needs besides."""
        return tensor_norms(grads, self.norm_type, shard_group=self._shard_group), None

    def clip_(self, grads: list[Tensor], params: list[Tensor], step: Step) -> ClipStats:
        """Clip ``grads`` in place from ``step``'s measurement; return the step's numbers."""
        raise NotImplementedError(f"{type(self).__name__} is a base class: use one of its subclasses")

    _per_optimizer = ("_tallies",)

    def _check_module(self, module: torch.nn.Module) -> None:
        super()._check_module(module)
        if not self.complex_ok and any(p.is_complex() for p in module.parameters()):
            raise ValueError(
                f"{type(self).__name__} does not clip complex parameters (torch's rule for it refuses them too). Exclude "
                "them with `exclude=[...]`, or use ClipByNorm or ClipByGlobalNorm, which clip by the modulus."
            )

    @property
    def _skips_steps(self) -> bool:
        """Whether the rule may skip a step of its own accord (then ``skipped_steps`` is logged)."""
        return self.skip_above is not None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        name = type(self).__name__
        if trainer.gradient_clip_val and self.clips:  # a rule that only skips leaves Lightning's clipping, after it, alone
            raise lightning.misconfiguration(
                trainer,
                f"{name} clips the gradients itself, but `Trainer(gradient_clip_val={trainer.gradient_clip_val})` "
                "is also set and Lightning would clip them a second time. Remove `gradient_clip_val` from the Trainer.",
            )
        lightning.refuse_deepspeed(trainer, name)
        # metric names: `<log_prefix>/...`, or `<log_prefix>/<Class>[k]/...` when clipping callbacks share the prefix
        shared = [cb for cb in trainer.callbacks if isinstance(cb, GradientClipCallback) and cb.log_prefix == self.log_prefix]
        same = [cb for cb in shared if type(cb) is type(self)]
        position = same.index(self) if len(same) > 1 else None
        self._state_key = self._make_state_key(**({} if position is None else {"position": position}))
        self._key_prefix = self.log_prefix
        if len(shared) > 1:
            self._key_prefix = f"{self.log_prefix}/{name}{'' if position is None else position}"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        _warn_fused_momentum(trainer.optimizers, lightning.loss_scaler(trainer))
        if self.per_step_state and any(isinstance(opt, torch.optim.LBFGS) for opt in trainer.optimizers):
            raise lightning.misconfiguration(
                trainer,
                f"{type(self).__name__} keeps statistics of one measurement per optimizer step, but `LBFGS` evaluates its "
                "closure, and so this hook, several times per step. Use ClipByGlobalNorm (which clips every evaluation) "
                "or another optimizer.",
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        plan = self._plan(optimizer, pl_module)
        self._clip_step(optimizer, plan, idx, lightning.loss_scaler(trainer), lightning.should_log(trainer), trainer.global_step)

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
            the names and values the callback logs in a Trainer (one optimizer's; a value that is not
            finite, such as the post-clip norm of a skipped step, is left out), ready for ``fabric.log_dict``.
        """
        optimizer, plan, idx, scaler = self._loop_step(module, optimizer, fabric)
        step = self._tallies[idx].steps if idx in self._tallies else 0
        if not step:
            _warn_fused_momentum([optimizer], scaler)
        self._clip_step(optimizer, plan, idx, scaler, metrics, step, loop="fabric" if fabric is not None else "plain")
        if not metrics:
            return {}
        values = read_metrics(self._pop_metrics(idx))
        self._written(values)
        return {k: v for k, v in values.items() if math.isfinite(v)}  # as a Trainer writes them

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._guard.undo()  # gradients hidden for a step that never ran (a loss scaler skipped it)
        n = self.max_consecutive_skips
        if self._on_device and not trainer.loggers and n and trainer.global_step % n == 0:  # no log reads the runs
            self._written(read_metrics(self._private_reads()))
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._guard.undo()  # nothing left on an optimizer after a failed fit
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._guard.undo()
            if self._on_device and any(t.steps > int(t.finite) for t in self._tallies.values()):  # no log read it
                self._warn_nonfinite("skipping the optimizer step")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def _clip_step(self, optimizer: torch.optim.Optimizer, plan: Plan, idx: int, scaler: Optional[torch.amp.GradScaler],
                   log_groups: bool, global_step: int, loop: Optional[str] = None) -> None:  # fmt: skip
        """Clip the gradients of ``plan``'s parameters for ``optimizer``'s coming step: select, measure,
        decide, clip, count. ``loop``: ``None`` in a Trainer, ``"fabric"`` or ``"plain"`` in a loop (a plain
        loop may have a ``GradScaler`` of its own, which would overwrite a ``found_inf``)."""
        self._guard.undo(optimizer, restore=False)  # a skip whose step never ran: new gradients have come since
        params, grads, positions = self._gradients(plan)
        if not grads:
            return
        # a fused optimizer's gradients are still scaled: its norms are divided by the scale
        scale = lightning.pending_scale(scaler, optimizer, self.scale_invariant and self.norm_type in EXACT_UNDER_SCALE)
        norms, extra, norm = self._measure(grads, scale)
        takes_flag = loop != "plain" and scaler is None and not self.reads_norm and takes_found_inf(optimizer)
        fate = decide(norm, policy=self.nonfinite, scaler=scaler is not None, skip_above=self.skip_above,
                      read=self.reads_norm, takes_flag=takes_flag)  # fmt: skip
        tally = self._tallies.setdefault(idx, Tally())
        if log_groups and self.group_depth is not None:
            tally.groups = self._group_norms(plan, positions, norms, self.norm_type)
        if fate.action == "error":
            self._count(idx, fate, ClipStats(fate.host, math.nan, math.nan, False), global_step)  # logged on failure
            self._raise_nonfinite(plan, positions, grads, global_step)
        if fate.action == "zero":
            norms, extra, norm, fate = self._zero_(grads, fate)
        fate, stats = _rule_skip(fate, self._run(grads, params, idx, norms, norm, extra, fate, scaler is not None))
        if fate.action == "skip" or stats.skip:
            if scale is not None:  # the scaler checks for inf what it unscales: without it, its step and update fail
                scaler.unscale_(optimizer)
            self._guard.skip(optimizer, at_step=loop is not None)
        elif fate.action == "device":
            self._guard.flag(optimizer, fate.flag)
            self._on_device = True
        self._count(idx, fate, stats, global_step)

    def _measure(self, grads: list[Tensor], scale: Optional[Tensor]) -> tuple[Tensor, Any, Tensor]:
        """The rule's measurement of ``grads`` (true norms: divided by a loss ``scale`` still on them), and their total."""
        norms, extra = self.measure(grads)
        if scale is not None:
            norms = norms / scale.to(norms.device)  # the coefficients apply to the scaled gradients alike
        return norms, extra, combine_norms(norms, self.norm_type)

    def _raise_nonfinite(self, plan: Plan, positions: Sequence[int], grads: list[Tensor], global_step: int) -> None:
        """``nonfinite="error"``: raise naming the parameters whose gradients are not finite."""
        bad = [plan.names[i] for i, g in zip(positions, grads) if not torch.isfinite(g).all()]
        raise RuntimeError(
            f"{type(self).__name__}: non-finite gradients at global step {global_step} in {bad}. "
            "Set `nonfinite='skip'` to skip such steps, or find the source (learning rate, loss, data)."
        )

    def _zero_(self, grads: list[Tensor], fate: Fate) -> tuple[Tensor, Any, Tensor, Fate]:
        """``nonfinite="zero"``: zero the non-finite entries and measure again (a second read, at such a step
        only); the step runs, and counts as non-finite."""
        self._warn_nonfinite("zeroing the non-finite entries")
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        norms, extra, norm = self._measure(grads, None)
        return norms, extra, norm, fate._replace(action="run", host=norm.item())

    def _run(self, grads: list[Tensor], params: list[Tensor], idx: int, norms: Tensor, norm: Tensor, extra: Any,
             fate: Fate, scaled: bool) -> ClipStats:  # fmt: skip
        """The rule's clipping of a step that runs, or may (none for a skipped one): where the step is skipped on the device, or its
        non-finite gradients are left to a loss scaler (``scaled``) unread, the rule is given measurements of
        0 (a coefficient of 1: the gradients are not scaled) and no post-clip norm or threshold is claimed."""
        if fate.action == "skip" or (scaled and fate.nonfinite is True):  # skipped here, or by the scaler: not run
            if fate.action == "skip" and fate.nonfinite:
                self._warn_nonfinite("skipping the optimizer step")
            return ClipStats(fate.host, math.nan, math.nan, False)
        mask = fate.flag.bool() if fate.action == "device" else fate.nonfinite if scaled and isinstance(fate.nonfinite, Tensor) else None
        if mask is None:
            return self.clip_(grads, params, Step(idx, norms, norm, fate.host, fate.nonfinite is not True, extra))
        zero = lambda t: torch.where(mask, 0.0, t) if isinstance(t, Tensor) else t  # noqa: E731
        stats = self.clip_(grads, params, Step(idx, zero(norms), zero(norm), None, True, zero(extra), mask))
        nan = lambda v: torch.where(mask, math.nan, torch.as_tensor(v))  # noqa: E731
        return stats._replace(norm=norm, norm_clipped=nan(stats.norm_clipped), threshold=nan(stats.threshold))

    def _count(self, idx: int, fate: Fate, stats: ClipStats, global_step: int) -> None:
        """Add the step to optimizer ``idx``'s tally: a skipped step is not a clipped one, nor in the clip rate."""
        t = self._tallies[idx]
        skipped = skips(fate, stats)
        finite = _not(fate.nonfinite)
        ran = finite & _not(skipped)
        t.steps += 1
        t.finite, t.ran, t.clipped = t.finite + finite, t.ran + ran, t.clipped + (stats.clipped & ran)
        if self._skips_steps:
            t.skipped = t.skipped + (finite & skipped)
        t.norm_max = _fmax(t.norm_max, torch.where(finite, stats.norm, math.nan) if isinstance(finite, Tensor) else stats.norm if finite else math.nan)
        t.last = stats
        if isinstance(skipped, Tensor):  # on the device: the first run to reach the bound is read at the next log
            t.streak = (t.streak + 1) * skipped
            t.since = torch.where(t.streak == 1, global_step, t.since)
            if self.max_consecutive_skips is not None:
                t.tripped = torch.where((t.tripped < 0) & (t.streak >= self.max_consecutive_skips), t.since, t.tripped)
        else:
            t.since = global_step if skipped and not t.streak else t.since
            t.streak = t.streak + 1 if skipped else 0
            self._check_streak(int(t.streak), int(t.since))

    def _check_streak(self, streak: int, since: int) -> None:
        """Stop a fit whose last ``max_consecutive_skips`` steps were all skipped."""
        if self.max_consecutive_skips is not None and streak >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{type(self).__name__}: {streak} optimizer steps in a row were skipped, since global step {since} "
                f"(`max_consecutive_skips={self.max_consecutive_skips}`): the gradients stay non-finite, or the rule keeps "
                "skipping them. Lower the learning rate, check the loss and data, or raise the rule's bound (`skip_above`, "
                "ZClip's `skip_step_z_thresh`, SkipSpikes' `sigma`)."
            )

    def _pop_metrics(self, idx: Optional[int] = None) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for i, t in self._tallies.items():
            steps, ran, clipped = t.at_log
            if t.steps == steps or idx not in (None, i):
                continue  # no step since the last log
            values: dict[str, Value] = {names.NORM_MAX: t.norm_max}
            if t.last is not None:
                values.update({names.NORM: t.last.norm, names.NORM_CLIPPED: t.last.norm_clipped, names.THRESHOLD: t.last.threshold})
                values.update(t.last.extra or {})
            if self.clips:  # a rule that only skips has no clip rate
                values[names.CLIP_RATE] = _ratio(t.clipped - clipped, t.ran - ran)  # over the steps that ran
            values[names.NONFINITE_STEPS] = t.steps - t.finite
            if self._skips_steps:
                values[names.SKIPPED_STEPS] = t.skipped
            values.update({f"{names.GROUP_NORM}/{g}": n for g, n in (t.groups or {}).items()})
            out.update((self._metric_key(k, i), v) for k, v in values.items())
            out.update(self._private_reads(i))  # read with the metrics, taken out in `_written`
            t.at_log, t.groups, t.norm_max = (t.steps, t.ran, t.clipped), None, math.nan
        return out

    def _private_reads(self, idx: Optional[int] = None) -> dict[str, Value]:
        """What is read with the metrics under private keys (``_written`` takes them out): the device-side
        runs of skips to check."""
        return {f"\0tripped{i}": t.tripped for i, t in self._tallies.items() if isinstance(t.tripped, Tensor) and idx in (None, i)}

    def _written(self, values: dict[str, float]) -> None:
        for key in [k for k in values if k.startswith("\0tripped")]:
            if (since := values.pop(key)) >= 0:
                self._check_streak(int(self.max_consecutive_skips or 0), int(since))
        # a step skipped on the device (`found_inf`) is first known here, at the next logging step
        if self._on_device and any(v > 0 for k, v in values.items() if k.endswith(f"/{names.NONFINITE_STEPS}")):
            self._warn_nonfinite("skipping the optimizer step")

    def state_dict(self) -> dict[str, Any]:
        # the counts at the last log too: the first rate logged after a resume in the middle of a
        # logging interval still covers the whole interval
        keys = ("finite", "ran", "clipped", "skipped", "streak", "since")
        return {
            "tallies": {
                i: {"steps": t.steps, **{k: int(getattr(t, k)) for k in keys}, "at_log": tuple(int(v) for v in t.at_log),
                    "norm_max": float(t.norm_max)}  # fmt: skip
                for i, t in self._tallies.items()
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, saved in state_dict.get("tallies", {}).items():
            try:
                self._tallies[int(i)] = Tally(**{**saved, "at_log": tuple(saved["at_log"])})
            except (TypeError, KeyError):
                lightning.rank_zero_warn(f"{type(self).__name__}: the checkpoint's counts for optimizer {i} do not fit; they start afresh.")

    def _warn_nonfinite(self, action: str) -> None:
        if not self._warned:
            self._warned = True
            lightning.rank_zero_warn(
                f"{type(self).__name__}: non-finite gradients found, {action} (nonfinite={self.nonfinite!r}). "
                f"Such steps are counted in `{self._key_prefix}/{names.NONFINITE_STEPS}`; this warning is shown once."
            )

    def _unclipped(self, step: Step, threshold: float) -> Optional[ClipStats]:
        """The numbers of a step that changes nothing, where the host knows it is one: its norm, read
        (of the same order as the fixed ``threshold``), is at most ``threshold``; ``None`` otherwise."""
        if step.host is None or not step.host <= threshold:
            return None
        return ClipStats(step.host, step.host, threshold, False)
