"""The example's IRNN trained in a Lightning Fabric loop, clipped and monitored by gradclip_plugin.

    .venv/bin/python examples/fabric_train.py                 # 300 steps on CPU, TensorBoard logs in fabric_logs/
    .venv/bin/python examples/fabric_train.py --precision 16-mixed --steps 100

Fabric has no callbacks of its own for clipping: between ``fabric.backward(loss)`` and
``optimizer.step()`` the loop calls ``clip.clip_gradients(model, optimizer, fabric=fabric)``, which
unscales the gradients under a loss scaler, clips them (skipping the step if they are not finite)
and returns the metrics a Trainer would log; ``monitor.gradient_norms(...)`` does the same for
monitoring. A plain PyTorch loop calls them the same way, without ``fabric=``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import IRNNRegressor, SequenceSumData  # noqa: E402  (the model and the generated data)

from gradclip_plugin import ClipByGlobalNorm, GradientNormMonitor  # noqa: E402
from gradclip_plugin.tensorboard import write_fabric  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-norm", type=float, default=50.0)
    p.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed"])
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)

    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if args.precision == "16-mixed" else []
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugins, loggers=TensorBoardLogger("fabric_logs", name="irnn"))
    fabric.seed_everything(0)
    data = SequenceSumData(num_train=args.steps * 32)
    model = IRNNRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    train = fabric.setup_dataloaders(DataLoader(data.make(args.steps * 32, 0), batch_size=32))
    clip = ClipByGlobalNorm(args.max_norm, group_depth=1)  # also logs the pre-clip norm of each module
    monitor = GradientNormMonitor(log_prefix="grad_norm_clipped")  # after clip_gradients: post-clip norms

    for step, (x, y) in enumerate(train):
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        log = (step + 1) % args.log_every == 0
        metrics = clip.clip_gradients(model, optimizer, fabric=fabric, metrics=log)  # no host read if not log
        metrics.update(monitor.gradient_norms(model, optimizer, fabric=fabric, metrics=log))  # every step: total_max
        if log:
            fabric.log_dict({**metrics, "train_loss": loss.item()}, step=step)
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:  # TensorBoard's layout and each callback's text (the monitor knows its groups now)
            write_fabric(fabric, clip, monitor)
    write_fabric(fabric, clip, monitor, step=step)  # and the report's figure, in the Images tab

    x, y = data.make(512, 1).tensors
    with torch.no_grad():
        val_loss = nn.functional.mse_loss(model(x), y).item()
    print(f"final validation loss {val_loss:.3f} (predicting the mean scores about 2.0)")
    print(f"clip state to save in a checkpoint: {sorted(clip.state_dict())}; TensorBoard logs in fabric_logs/")
    fabric.logger.finalize("success")
    return val_loss


if __name__ == "__main__":
    main()
