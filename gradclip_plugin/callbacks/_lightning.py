"""Everything the callbacks take from Lightning beyond its public ``Callback`` API, in one module.

Lightning ships under two import names, ``pytorch_lightning`` and the unified package's
``lightning.pytorch``: the same code, but a class of one is not a subclass of the other's. The
callbacks are one class for both (their bases are both ``Callback`` classes, where installed), and
whatever depends on the Trainer's namespace (its strategy, logger and exception classes) is looked
up here, in the Trainer's own namespace. So are the few private attributes the callbacks need.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn  # noqa: F401 - one rank-zero warning for both namespaces

#: the Lightning namespaces installed, ``pytorch_lightning`` (the declared dependency) first
NAMESPACES = tuple(ns for ns in ("pytorch_lightning", "lightning.pytorch") if importlib.util.find_spec(ns.split(".")[0]))
#: the ``Callback`` class of each: a gradclip callback subclasses them all, so that either namespace's
#: Trainer and LightningCLI (which checks ``issubclass(cls, Callback)``) take it
CALLBACK_BASES: tuple[type, ...] = tuple(importlib.import_module(f"{ns}.callbacks").Callback for ns in NAMESPACES)
#: the ``MisconfigurationException`` of each, for an error that either namespace's ``except`` clause catches
MISCONFIGURATION_BASES: tuple[type, ...] = tuple(
    importlib.import_module(f"{ns}.utilities.exceptions").MisconfigurationException for ns in NAMESPACES
)


def _namespace(trainer: Any) -> str:
    """``"lightning.pytorch"`` for a Trainer of the unified package, else ``"pytorch_lightning"``."""
    unified = sys.modules.get("lightning.pytorch")
    return "lightning.pytorch" if unified is not None and isinstance(trainer, unified.Trainer) else "pytorch_lightning"


def _class(trainer: Any, path: str) -> type:
    """The class ``path`` (``"strategies.FSDPStrategy"``) of the Trainer's namespace."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"{_namespace(trainer)}.{module}"), name)


def misconfiguration(trainer: Any, message: str) -> Exception:
    """A ``MisconfigurationException`` of the Trainer's own namespace, so that ``except`` clauses written
    for either namespace catch it."""
    return _class(trainer, "utilities.exceptions.MisconfigurationException")(message)


def should_log(trainer: Any) -> bool:
    """Whether this batch's metrics go to the loggers (``Trainer(log_every_n_steps=...)``).

    The logger connector's private ``should_update_logs``, as Lightning's own ``LearningRateMonitor``
    uses: there is no public equivalent.
    """
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def log_step(trainer: Any) -> int:
    """The step Lightning's loggers use for this batch (``LearningRateMonitor``'s choice), a private counter."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def loss_scaler(trainer: Any) -> Optional[torch.amp.GradScaler]:
    """The precision plugin's enabled loss scaler (``16-mixed``), or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscaled(trainer: Any, loss: torch.Tensor) -> torch.Tensor:
    """The loss Lightning passes to ``on_before_backward``, without the ``16-mixed`` loss scale its precision
    plugin multiplied it by (the scaler's private scale tensor: no host read)."""
    scaler = loss_scaler(trainer)
    return loss if scaler is None else loss / scaler._scale


def flat_shard_group(trainer: Any) -> Optional[Any]:
    """The process group FSDP1 (``FSDPStrategy``) shards flat parameters over, or ``None``.

    Under FSDP1 a gradient is this rank's piece of a flat parameter, a plain tensor: the norms
    must be reduced over this group. FSDP2 gradients are DTensors and need no help.
    """
    if not isinstance(trainer.strategy, _class(trainer, "strategies.FSDPStrategy")):
        return None
    return _fsdp_group(trainer.strategy.model)


def _fsdp_group(module: Any) -> Optional[Any]:
    """The process group of the first FSDP1 module in ``module``, unless it does not shard."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    fsdp = next((m for m in module.modules() if isinstance(m, FullyShardedDataParallel)), None)
    return None if fsdp is None or fsdp.sharding_strategy == ShardingStrategy.NO_SHARD else fsdp.process_group


# ---------------------------------------------------------------------------------------------- loops
def unwrap(obj: Any) -> Any:
    """The user's module or optimizer inside Lightning's wrappers (Fabric's ``_FabricModule`` and
    ``_FabricOptimizer``, ``LightningOptimizer``: their private ``_original_module`` and ``_optimizer``)."""
    for attr in ("_original_module", "_optimizer"):
        inner = getattr(obj, attr, None)
        if inner is not None:
            return inner
    return obj


def pending_scale(scaler: Optional[torch.amp.GradScaler], optimizer: Any, divisible: bool = True) -> Optional[torch.Tensor]:
    """The loss scale still on ``optimizer``'s gradients, a 0-dim device tensor, or ``None``.

    A fused optimizer (``AdamW(fused=True)``) unscales inside its ``step()``, so Lightning leaves its
    gradients scaled; the scaler's private scale tensor and per-optimizer stage tell by how much.
    Unless the caller can divide its norms by the scale (``divisible``), the gradients are unscaled
    here instead (a pass over them, as Lightning's for other optimizers) and ``None`` is returned.
    """
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False) or not _scaled(scaler, optimizer):
        return None
    if not divisible:
        scaler.unscale_(optimizer)
        return None
    return scaler._scale


def loop_scaler(fabric: Any, optimizer: Any) -> Optional[torch.amp.GradScaler]:
    """Fabric's enabled loss scaler, after unscaling ``optimizer``'s gradients (once a step, as
    ``fabric.clip_gradients`` does; the scaler's private per-optimizer stage tells whether it was)."""
    scaler = getattr(getattr(getattr(fabric, "strategy", None), "precision", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    if _scaled(scaler, optimizer):
        scaler.unscale_(optimizer)
    return scaler


def _scaled(scaler: torch.amp.GradScaler, optimizer: Any) -> bool:
    """Whether ``optimizer``'s gradients are still scaled this step (the scaler's private per-optimizer stage)."""
    from torch.amp.grad_scaler import OptState

    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY


def loop_shard_group(fabric: Any, module: Any) -> Optional[Any]:
    """The FSDP1 shard group of a module set up by Fabric's ``FSDPStrategy``, or ``None``."""
    if fabric is None:
        return None
    namespace = "lightning.fabric" if type(fabric).__module__.startswith("lightning.") else "lightning_fabric"
    strategy = getattr(importlib.import_module(f"{namespace}.strategies"), "FSDPStrategy")
    return _fsdp_group(module) if isinstance(fabric.strategy, strategy) else None


def refuse_deepspeed(trainer: Any, owner: str) -> None:
    """Raise ``MisconfigurationException`` under DeepSpeed, whose engine partitions and steps the gradients."""
    if isinstance(trainer.strategy, _class(trainer, "strategies.DeepSpeedStrategy")):
        raise misconfiguration(
            trainer,
            f"{owner} cannot clip under DeepSpeed: the engine partitions the gradients and steps them itself. "
            "Use DeepSpeed's own `gradient_clipping` setting instead.",
        )


def tensorboard_writers(trainer: Any) -> list[tuple[Any, str]]:
    """``(SummaryWriter, tag prefix)`` of each ``TensorBoardLogger`` of the Trainer.

    The tag prefix is what ``TensorBoardLogger(prefix=...)`` puts before every metric name (its private
    ``_prefix``): ``"<prefix>-"``, or ``""``.
    """
    logger_class = _class(trainer, "loggers.TensorBoardLogger")
    return [
        (logger.experiment, f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else "")
        for logger in trainer.loggers
        if isinstance(logger, logger_class)
    ]
