"""One class for both Lightning namespaces: ``pytorch_lightning`` and the unified ``lightning.pytorch``.

Each test runs under both: the Trainer, LightningCLI, TensorBoardLogger, precision plugin, strategy
and exception classes of that namespace, with the same gradclip callbacks. The FSDP1 and
ModelParallel runs of both namespaces are in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradclip_plugin import ClipByGlobalNorm, ClipByValue, GradientNormMonitor
from helpers import NAMESPACES, for_namespace, make_loader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=NAMESPACES)
def ns(request):
    return for_namespace(request.param)


def mod(ns, path: str):
    """``ns.pl``'s submodule ``path`` (``"loggers"``: ``lightning.pytorch.loggers``)."""
    return importlib.import_module(f"{ns.pl.__name__}.{path}")


def global_norm64(grads) -> float:
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])).item()


def test_clipping_equals_the_formula_on_the_probed_gradients(tmp_path, ns):
    before, cb, after = ns.GradProbe(), ClipByGlobalNorm(5.0), ns.GradProbe()
    ns.make_trainer(tmp_path, [before, cb, after]).fit(ns.TinyModel(), make_loader())
    assert len(before.steps) == 4
    for b, a in zip(before.steps, after.steps):
        coef = min(1.0, 5.0 / global_norm64(b.values()))
        assert coef < 1
        for name in b:
            torch.testing.assert_close(a[name], (b[name].double() * coef).float())


def test_a_nonfinite_step_is_skipped_with_weights_and_adam_state_untouched(tmp_path, ns):
    class Poisoned(ns.TinyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    model = Poisoned(optimizer="adam")
    snapshots = []

    class Snapshot(ns.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append([p.detach().clone() for p in pl_module.parameters()])

    trainer = ns.make_trainer(tmp_path, [ClipByValue(1.0), Snapshot()], max_steps=3)
    with pytest.warns(UserWarning, match="skipping the optimizer step"):
        trainer.fit(model, make_loader())
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # batch 1 skipped
    assert not any(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {2}


def test_tensorboard_layout_histograms_and_rule_in_the_namespaces_logger(tmp_path, ns):
    logger = mod(ns, "loggers").TensorBoardLogger(tmp_path, name="run", version=0)
    callbacks = [GradientNormMonitor(histogram_every_n_steps=1, weight_norms=True, update_ratio=True), ClipByGlobalNorm(1.0)]
    ns.make_trainer(tmp_path, callbacks, logger=logger, max_steps=2).fit(ns.TinyModel(), make_loader())
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    assert {"grad_values/grad_norm/encoder", "grad_values/grad_norm/head"} <= set(acc.Tags()["histograms"])
    assert {"custom_scalars__config__", "grad_clip/callback/text_summary"} <= set(acc.Tags()["tensors"])
    assert {"grad_clip/norm", "grad_norm/total", "grad_norm/weight/head", "grad_norm/update_ratio/head"} <= set(acc.Tags()["scalars"])


def test_lightning_cli_builds_the_callback_from_yaml_and_refuses_a_misspelt_key(tmp_path, ns):
    cli_mod = mod(ns, "cli")
    config = tmp_path / "config.yaml"

    def run(init_args: str):
        config.write_text(
            "trainer:\n  logger: false\n  callbacks:\n    - class_path: gradclip_plugin.ClipByGlobalNorm\n"
            f"      init_args: {init_args}\n"
        )
        return cli_mod.LightningCLI(ns.TinyModel, run=False, args=["--config", str(config)],
                                    parser_kwargs={"exit_on_error": False})  # fmt: skip

    cli = run("{max_norm: 0.5, norm_type: inf}")
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, ClipByGlobalNorm)]
    assert (cb.max_norm, cb.norm_type) == (0.5, float("inf"))
    with pytest.raises((SystemExit, Exception), match="max_nrom"):
        run("{max_nrom: 0.5}")


def test_setup_errors_are_the_trainers_own_misconfiguration_exception(tmp_path, ns):
    exception = mod(ns, "utilities.exceptions").MisconfigurationException
    trainer = ns.make_trainer(tmp_path, [ClipByGlobalNorm(1.0)], gradient_clip_val=1.0)
    with pytest.raises(exception, match="gradient_clip_val"):
        trainer.fit(ns.TinyModel(), make_loader())


def test_the_loss_scaler_of_the_namespaces_precision_plugin_is_found(tmp_path, ns):
    # under 16-mixed the callback sees unscaled gradients, and an overflow is the scaler's to skip
    MixedPrecision = mod(ns, "plugins.precision").MixedPrecision  # noqa: N806
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))

    class Overflowing(ns.TinyModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    cb = ClipByGlobalNorm(1.0, nonfinite="error")  # "error" would raise if the overflow were its to handle
    before, after = ns.GradProbe(), ns.GradProbe()
    ns.make_trainer(tmp_path, [before, cb, after], plugins=[scaler], max_steps=3).fit(Overflowing(), make_loader(scale=1.0))
    unscaled = global_norm64(before.steps[0].values())
    assert 0 < unscaled < 2.0**6  # not multiplied by the 2^8 loss scale
    assert cb.state_dict()["tallies"][0]["steps"] - cb.state_dict()["tallies"][0]["finite"] == 1


def test_deepspeed_is_refused(tmp_path, ns, monkeypatch):
    DeepSpeedStrategy = mod(ns, "strategies").DeepSpeedStrategy  # noqa: N806
    exception = mod(ns, "utilities.exceptions").MisconfigurationException
    cb = ClipByGlobalNorm(1.0)
    trainer = ns.make_trainer(tmp_path, [cb])
    # deepspeed is not installed, so its strategy's __init__ cannot run; setup only needs the type
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", object.__new__(DeepSpeedStrategy))
    with pytest.raises(exception, match="cannot clip under DeepSpeed"):
        cb.setup(trainer, ns.TinyModel(), "fit")


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers import for_namespace, make_loader
ns = for_namespace({ns!r})
trainer = ns.make_trainer({out!r}, [], max_steps=1)
print("CALLBACKS", [type(cb).__name__ for cb in trainer.callbacks if type(cb).__module__.startswith("gradclip")])
trainer.fit(ns.TinyModel(), make_loader())
os.environ["GRADCLIP_CONFIG"] = {missing!r}
ns.make_trainer({out!r}, [])
"""


def test_the_zero_code_route_reaches_the_namespaces_trainer_and_a_missing_file_stops_it(tmp_path, ns):
    config = tmp_path / "gradclip.yaml"
    config.write_text(textwrap.dedent("""\
        - class_path: GradientNormMonitor
        - class_path: gradclip_plugin.ClipByGlobalNorm
          init_args: {max_norm: 1.0}
        """))
    missing = str(tmp_path / "missing.yaml")
    script = SCRIPT.format(tests=str(ROOT / "tests"), ns=ns.pl.__name__, out=str(tmp_path), missing=missing)
    env = {**os.environ, "GRADCLIP_CONFIG": str(config)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "CALLBACKS ['GradientNormMonitor', 'ClipByGlobalNorm']" in result.stdout, result.stderr
    assert result.returncode != 0
    assert f"GradclipConfigError: GRADCLIP_CONFIG={missing!r}: no such file" in result.stderr


def test_skip_spikes_skips_a_loss_spike_and_unscales_the_loss_in_the_namespace(tmp_path, ns):
    """SkipSpikes in either namespace's Trainer: the 16-mixed loss it decides on is unscaled (the
    namespace's precision plugin scaled it), and a loss 1,000 times larger than the rest is skipped."""
    from gradclip_plugin import SkipSpikes

    class Spiky(ns.TinyModel):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (1e3 if batch_idx == 10 else 1.0)

    cb, seen = SkipSpikes(window=8, sigma=6.0, watch="loss"), []
    original = cb.clip_
    cb.clip_ = lambda grads, params, step: (seen.append(float(cb._step_loss)), original(grads, params, step))[1]
    plugin = mod(ns, "plugins").MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    torch.manual_seed(0)
    ns.make_trainer(tmp_path, [cb], max_steps=14, plugins=[plugin]).fit(Spiky(optimizer="adam"), make_loader(n=64))
    assert 0 < seen[0] < 1e3  # TinyModel's mse, not 1,024 times it
    losses = torch.tensor(seen)
    expected = []  # the rule, from torch.std_mean over the previous (at most 8) losses, active from the 4th
    for i in range(3, len(seen)):
        std, mean = torch.std_mean(losses[max(0, i - 8) : i])
        expected += [i] * bool(losses[i] - mean > 6.0 * std)
    assert [s.global_step for s in cb.skipped] == expected and 10 in expected
