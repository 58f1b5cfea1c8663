"""A LightningCLI entry point: a small recurrent model on generated data, configured from YAML.

    python examples/train.py fit --config examples/configs/clip_by_global_norm.yaml
    python examples/train.py fit --config examples/configs/combined.yaml --trainer.max_steps=100
    python examples/train.py fit --print_config      # every option, with its default

The model is an IRNN (a vanilla ReLU RNN whose recurrent weights start as the identity, Le et
al. 2015): at ``lr=0.001`` with momentum its gradient norm jumps from about 80 to about 1e5 at the
second step and wrecks the weights unless it is clipped, which makes it a small, honest test bed for
the callbacks. The data are generated in code
(no download): sequences of Gaussian noise whose target is a signed, scaled sum over time.

The clipping and monitoring callbacks come from the config's ``trainer.callbacks``; nothing in
this file refers to them.
"""

from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SequenceSumData(pl.LightningDataModule):
    """Sequences ``x`` of shape ``(seq_len, 2)`` drawn from N(0, 1); target ``(sum x[:, 0] - sum x[:, 1]) / sqrt(seq_len)``.

    The target has variance 2, so a model that predicts its mean (0) scores an MSE of 2.

    Args:
        seq_len: steps per sequence; longer sequences make gradients explode faster.
        num_train: training sequences (one epoch is ``num_train / batch_size`` steps).
        num_val: validation sequences.
        batch_size: sequences per batch.
        seed: seed of the generator, so that every run sees the same data.
    """

    def __init__(
        self, seq_len: int = 50, num_train: int = 9600, num_val: int = 512, batch_size: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        for name, value in [("seq_len", seq_len), ("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.save_hyperparameters()
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def make(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.hparams.seq_len, 2, generator=g)
        y = (x[..., 0].sum(1, keepdim=True) - x[..., 1].sum(1, keepdim=True)) / math.sqrt(self.hparams.seq_len)
        return TensorDataset(x, y)

    def setup(self, stage: str) -> None:
        self.train_set = self.make(self.hparams.num_train, self.hparams.seed)
        self.val_set = self.make(self.hparams.num_val, self.hparams.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.num_val)


class IRNNRegressor(pl.LightningModule):
    """A vanilla ReLU RNN with identity-initialised recurrent weights, trained with SGD + momentum.

    Args:
        hidden_size: units per recurrent layer.
        num_layers: stacked recurrent layers.
        recurrent_gain: the recurrent weights start as ``recurrent_gain * I``; at 1.0 and above
            activations and gradients can grow without bound through time.
        lr: SGD learning rate.
        momentum: SGD momentum.
        fused: torch's fused SGD (``SGD(fused=True)``), one kernel per step; it takes a device-side
            ``found_inf``, so gradclip's ``skip`` needs no host read.

    References:
        Le, Jaitly and Hinton 2015, "A Simple Way to Initialize Recurrent Networks of Rectified Linear Units".
    """

    def __init__(
        self,
        hidden_size: int = 32,
        num_layers: int = 1,
        recurrent_gain: float = 1.0,
        lr: float = 0.001,
        momentum: float = 0.5,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be a positive number, got {lr!r}")
        self.save_hyperparameters()
        self.rnn = nn.RNN(2, hidden_size, num_layers, nonlinearity="relu", batch_first=True)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.eye_(p)
                p.data.mul_(recurrent_gain)
            elif name.startswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.1)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum, fused=self.hparams.fused)


def main(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return LightningCLI(
        IRNNRegressor,
        SequenceSumData,
        seed_everything_default=0,
        trainer_defaults={"max_steps": 300, "log_every_n_steps": 10},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
