"""Shared test pieces: a tiny model, a probe callback that records gradients, a Trainer factory.

Each comes in both Lightning namespaces (``for_namespace("lightning.pytorch")``: a Trainer of one
namespace takes only a LightningModule of its own); the module-level names are ``pytorch_lightning``'s.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: the two import names of Lightning, as pytest parameters
NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


def make_loader(n: int = 32, batch_size: int = 4, in_features: int = 8, seed: int = 0, scale: float = 10.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g) * scale
    y = torch.randn(n, 1, generator=g) * scale
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@functools.cache
def for_namespace(ns: str) -> SimpleNamespace:
    """``pl``, ``TinyModel``, ``TwoOptimizerModel``, ``GradProbe`` and ``make_trainer`` of Lightning namespace ``ns``."""
    pl = importlib.import_module(ns)

    class TinyModel(pl.LightningModule):
        """Two linear layers; a large input scale makes gradients big enough to be clipped."""

        def __init__(self, lr: float = 0.01, optimizer: str = "sgd", in_features: int = 8):
            super().__init__()
            self.lr, self.optimizer_name = lr, optimizer
            self.encoder = nn.Linear(in_features, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.encoder(x)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            if self.optimizer_name == "adam":
                return torch.optim.Adam(self.parameters(), lr=self.lr)
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class TwoOptimizerModel(TinyModel):
        """Manual optimization with one optimizer per layer."""

        def __init__(self, lr: float = 0.01, **kwargs: Any):
            super().__init__(lr=lr, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt_enc, opt_head = self.optimizers()
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            opt_enc.zero_grad()
            opt_head.zero_grad()
            self.manual_backward(loss)
            opt_enc.step()
            opt_head.step()
            return loss

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.encoder.parameters(), lr=self.lr),
                torch.optim.SGD(self.head.parameters(), lr=self.lr),
            ]

    class GradProbe(pl.Callback):
        """Records, at each optimizer step, a copy of every parameter gradient (name -> tensor)."""

        def __init__(self) -> None:
            self.steps: list[dict[str, Optional[torch.Tensor]]] = []
            self.optimizers: list[int] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            names = {id(p): n for n, p in pl_module.named_parameters()}
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.steps.append({names[id(p)]: None if p.grad is None else p.grad.detach().clone() for p in params})
            self.optimizers.append(next(i for i, o in enumerate(trainer.optimizers) if o is optimizer))

    def make_trainer(tmp_path, callbacks, **kwargs: Any):
        defaults: dict[str, Any] = dict(
            default_root_dir=tmp_path,
            max_steps=4,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        defaults.update(kwargs)
        return pl.Trainer(callbacks=callbacks, **defaults)

    return SimpleNamespace(
        pl=pl, TinyModel=TinyModel, TwoOptimizerModel=TwoOptimizerModel, GradProbe=GradProbe, make_trainer=make_trainer
    )


_PL = for_namespace("pytorch_lightning")
TinyModel, TwoOptimizerModel, GradProbe, make_trainer = _PL.TinyModel, _PL.TwoOptimizerModel, _PL.GradProbe, _PL.make_trainer


def probe_around(cb: Any) -> tuple[Any, Any, list[Any]]:
    before, after = GradProbe(), GradProbe()
    return before, after, [before, cb, after]


def nonfinite_steps(cb: Any) -> dict[int, int]:
    """A clipping callback's count of non-finite steps per optimizer, from its checkpointed state."""
    return {i: t["steps"] - t["finite"] for i, t in cb.state_dict()["tallies"].items()}
