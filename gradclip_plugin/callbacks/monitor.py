"""GradientNormMonitor: the total gradient norm and one norm per group, from one fused pass."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from gradclip_plugin.callbacks.base import (
    NormType,
    _check_patterns,
    check_include,
    MeasuredNorms,
    flat_shard_group,
    gradient_pairs,
    measured_norms,
    metric_key,
    selects,
    log_step,
    optimizer_index,
    should_log,
    MetricWriter,
    write_metrics,
)
from gradclip_plugin.functional import subset_norms, tensor_norms
from gradclip_plugin.functional.norms import check_norm_type
from gradclip_plugin.functional.distributed import sharded_over

__all__ = ["GradientNormMonitor"]

#: the automatic depth keeps at most this many groups (unless depth 1 already has more)
AUTO_MAX_GROUPS = 10

GroupDepth = Union[int, Literal["auto", "parameter"]]


def module_path(name: str) -> list[str]:
    """The module part of a parameter name: ``"encoder.layers.0.weight"`` -> ``["encoder", "layers", "0"]``."""
    return name.split(".")[:-1]


def group_of(name: str, depth: Union[int, Literal["parameter"]]) -> str:
    """The group of parameter ``name``: its module path cut at ``depth``, or the name itself.

    A parameter that belongs to no submodule (``"scale"`` on the LightningModule itself) is its own group.
    """
    if depth == "parameter":
        return name
    path = module_path(name)
    return ".".join(path[:depth]) if path else name


def auto_depth(names: list[str], max_groups: int = AUTO_MAX_GROUPS) -> int:
    """The depth giving the most groups not above ``max_groups`` (the smallest such depth; at least 1)."""
    deepest = max((len(module_path(n)) for n in names), default=1)
    best, best_count = 1, len({group_of(n, 1) for n in names})
    for depth in range(2, deepest + 1):
        count = len({group_of(n, depth) for n in names})
        if count > max_groups:
            break
        if count > best_count:
            best, best_count = depth, count
    return best


class GradientNormMonitor(MetricWriter):
    """Log the total gradient norm and one norm per group of parameters, on logging steps only.

    Logs ``grad_norm/total`` and ``grad_norm/<group>`` (``grad_norm/opt<i>/...`` when the Trainer has
    several optimizers) every ``Trainer(log_every_n_steps=...)`` optimizer steps, to every logger.
    All norms of a step come from one fused pass (one ``torch._foreach_norm`` per device and dtype,
    then a segment sum) and one device-to-host copy; on steps that do not log nothing runs.

    It reads the gradients in ``on_before_optimizer_step``, in the order of ``Trainer(callbacks=[...])``:
    placed **before** a clipping callback it logs the pre-clip norms, placed **after** it the
    post-clip norms. Use two monitors with different ``log_prefix`` to see both. A clipping
    callback placed right after a monitor reuses the monitor's per-tensor norms on logging steps
    (same gradients, unchanged since), so monitoring adds no second pass over the gradients.

    Args:
        norm_type: order of the norm: any positive number, or ``inf``.
        group_depth: how parameters are grouped: an ``int`` cuts module names at that depth
            (``1``: ``encoder.layers.0.weight`` -> ``encoder``; ``2``: -> ``encoder.layers``);
            ``"parameter"`` gives one group per parameter; ``"auto"`` picks the depth that gives
            the most groups without going above ten.
        histogram_every_n_steps: with a ``TensorBoardLogger``, also write a histogram of the
            gradient values of each group every this many optimizer steps; ``None`` for none.
        include: fnmatch patterns on ``named_parameters()`` names; only matching parameters are
            counted. ``None`` selects every parameter.
        exclude: fnmatch patterns of parameters left out.
        log_prefix: prefix of the logged metric names; give two monitors different prefixes.

    Example YAML (pre- and post-clip norms around a clipping callback)::

        trainer:
          callbacks:
            - class_path: gradclip_plugin.GradientNormMonitor
              init_args:
                log_prefix: grad_norm          # before the clipping callback: pre-clip
                histogram_every_n_steps: 100
            - class_path: gradclip_plugin.ClipByGlobalNorm
              init_args:
                max_norm: 1.0
            - class_path: gradclip_plugin.GradientNormMonitor
              init_args:
                log_prefix: grad_norm_clipped  # after it: post-clip

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural networks" (monitoring
        the gradient norm to detect explosion); replaces Lightning's per-parameter ``grad_norm``.
    """

    def __init__(
        self,
        norm_type: NormType = 2.0,
        group_depth: GroupDepth = "auto",
        histogram_every_n_steps: Optional[int] = None,
        *,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        log_prefix: str = "grad_norm",
    ) -> None:
        self.norm_type = check_norm_type(norm_type)
        if group_depth not in ("auto", "parameter") and (
            isinstance(group_depth, bool) or not isinstance(group_depth, int) or group_depth < 1
        ):
            raise ValueError(
                f"`group_depth` must be a positive int, 'auto' or 'parameter', got {group_depth!r}"
            )
        self.group_depth = group_depth
        if histogram_every_n_steps is not None and (
            isinstance(histogram_every_n_steps, bool)
            or not isinstance(histogram_every_n_steps, int)
            or histogram_every_n_steps < 1
        ):
            raise ValueError(
                f"`histogram_every_n_steps` must be a positive int or None, got {histogram_every_n_steps!r}"
            )
        self.histogram_every_n_steps = histogram_every_n_steps
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        if not isinstance(log_prefix, str) or not log_prefix:
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}")
        self.log_prefix = log_prefix
        self._depth: Optional[Union[int, Literal["parameter"]]] = None
        self._shard_group: Optional[Any] = None  # FSDP1's, set in on_fit_start
        # per optimizer index: (ids of its params, [(param, group index)], group names)
        self._plan: dict[int, tuple[tuple[int, ...], list[tuple[Tensor, int]], list[str]]] = {}
        # (optimizer index, group indices of the params with a gradient) -> (subsets, groups, names)
        self._segments: dict[tuple[int, tuple[int, ...]], tuple[Tensor, list[int], list[str]]] = {}
        #: the per-tensor norms of the last logging step, which a clipping callback right after reuses
        self.measured: Optional[MeasuredNorms] = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        same = [cb for cb in trainer.callbacks if isinstance(cb, GradientNormMonitor) and cb.log_prefix == self.log_prefix]
        if len(same) > 1:
            raise MisconfigurationException(
                f"{len(same)} GradientNormMonitor callbacks share `log_prefix={self.log_prefix!r}` and would log "
                "to the same metric names. Give each its own, e.g. `log_prefix='grad_norm'` before the clipping "
                "callback and `log_prefix='grad_norm_clipped'` after it."
            )
        if self.histogram_every_n_steps is not None and not _tensorboard_writers(trainer):
            rank_zero_warn(
                f"GradientNormMonitor(histogram_every_n_steps={self.histogram_every_n_steps}) writes histograms "
                "to a TensorBoardLogger only, and the Trainer has none: no histogram will be written."
            )
        self._plan.clear()
        self._segments.clear()
        self._depth = None
        self.measured = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_include("GradientNormMonitor", self.include, pl_module)
        self._shard_group = flat_shard_group(trainer)  # FSDP1: norms reduced over the shard group

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from gradclip_plugin.tensorboard import write_layout

        write_layout(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        log_scalars = should_log(trainer)
        step = log_step(trainer)
        every = self.histogram_every_n_steps
        log_hist = every is not None and (step + 1) % every == 0 and bool(_tensorboard_writers(trainer))
        if not (log_scalars or log_hist):
            return
        idx = optimizer_index(trainer, optimizer)
        plan = self._plan_for(pl_module, optimizer, idx)
        group_of_param = {id(p): g for p, g in plan[1]}
        pairs = gradient_pairs([p for p, _ in plan[1]], self._shard_group)
        if not pairs:
            return
        grads = [g for _, g in pairs]
        members, segments, names = self._segments_for(
            idx, tuple(group_of_param[id(p)] for p, _ in pairs), plan[2], grads[0].device
        )
        if log_scalars:
            with sharded_over(self._shard_group):
                self._log_norms(trainer, idx, grads, members, names, step)
        if log_hist:
            self._log_histograms(trainer, idx, grads, segments, names, step)

    # ------------------------------------------------------------------ helpers
    def metric_key(self, name: str, idx: int, trainer: pl.Trainer) -> str:
        """This monitor's key for ``name`` of optimizer ``idx`` (see ``base.metric_key``)."""
        return metric_key(self.log_prefix, name, idx, trainer)

    @torch.no_grad()
    def _log_norms(
        self, trainer: pl.Trainer, idx: int, grads: list[Tensor], members: Tensor, names: list[str], step: int
    ) -> None:
        norms = tensor_norms(grads, self.norm_type)
        self.measured = measured_norms((trainer.global_step, idx), self.norm_type, grads, norms)
        keys = ["total"] + [n if n != "total" else "total_" for n in names]
        keys = [self.metric_key(k, idx, trainer) for k in keys]
        write_metrics(trainer, keys, subset_norms(norms, members, self.norm_type), step)  # total, then groups

    @torch.no_grad()
    def _log_histograms(
        self, trainer: pl.Trainer, idx: int, grads: list[Tensor], segments: list[int], names: list[str], step: int
    ) -> None:
        members: list[list[Tensor]] = [[] for _ in names]
        for g, s in zip(grads, segments):  # histogram steps only: TensorBoard bins the values on the host
            members[s].append(g.detach().reshape(-1).float().cpu())
        for writer in _tensorboard_writers(trainer):
            for name, parts in zip(names, members):
                values = torch.cat(parts)
                values = values[torch.isfinite(values)]  # TensorBoard cannot bin inf or NaN
                if values.numel():
                    writer.add_histogram(self.metric_key(f"values/{name}", idx, trainer), values, global_step=step)

    def _plan_for(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, idx: int
    ) -> tuple[tuple[int, ...], list[tuple[Tensor, int]], list[str]]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = tuple(id(p) for p in params)
        plan = self._plan.get(idx)
        if plan is not None and plan[0] == ids:
            return plan
        named = list(pl_module.named_parameters())
        names = {id(p): n for n, p in named}
        if self._depth is None:
            self._depth = auto_depth([n for n, _ in named]) if self.group_depth == "auto" else self.group_depth
        group_names: list[str] = []
        index: dict[str, int] = {}
        members: list[tuple[Tensor, int]] = []
        for p in params:
            name = names.get(id(p))
            if not selects(name, self.include, self.exclude):
                continue
            group = "unnamed" if name is None else group_of(name, self._depth)
            if group not in index:
                index[group] = len(group_names)
                group_names.append(group)
            members.append((p, index[group]))
        self._plan[idx] = plan = (ids, members, group_names)
        self._segments = {k: v for k, v in self._segments.items() if k[0] != idx}
        return plan

    def _segments_for(
        self, idx: int, groups: tuple[int, ...], all_names: list[str], device: torch.device
    ) -> tuple[Tensor, list[int], list[str]]:
        """For the gradients present: the subsets to take norms of (a bool device tensor, one row for all
        of them, then one per group that has one), each gradient's group (host list, numbered over
        those groups), and those groups' names."""
        cached = self._segments.get((idx, groups))
        if cached is None or cached[0].device != device:
            order = sorted(set(groups))
            compact = {g: i for i, g in enumerate(order)}
            segments = [compact[g] for g in groups]
            rows = [[True] * len(segments)] + [[s == k for s in segments] for k in range(len(order))]
            members = torch.tensor(rows, dtype=torch.bool, device=device)
            cached = self._segments[(idx, groups)] = (members, segments, [all_names[g] for g in order])
        return cached


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each ``TensorBoardLogger`` of the Trainer."""
    from pytorch_lightning.loggers import TensorBoardLogger

    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
