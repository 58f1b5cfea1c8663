"""examples/train.py and examples/configs: every config parses and trains a few steps; bad values stop the CLI."""

from __future__ import annotations

import csv
import importlib
import math
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from gradclip_plugin.callbacks.base import GradientClipCallback
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.callbacks.spikes import SkipSpikes
from gradclip_plugin.plugin import load_callbacks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def load_train():
    spec = importlib.util.spec_from_file_location("examples_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = load_train()

FAST = [
    "--trainer.max_steps=3",
    "--trainer.log_every_n_steps=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.num_sanity_val_steps=0",
    "--data.seq_len=8",
    "--data.num_train=64",
    "--data.num_val=8",
    "--data.batch_size=8",
]


def run_cli(tmp_path: Path, *args: str):
    logger = (
        '--trainer.logger={"class_path": "pytorch_lightning.loggers.CSVLogger", '
        f'"init_args": {{"save_dir": "{tmp_path}", "name": "run", "version": 0}}}}'
    )
    return train.main(["fit", *args, *FAST, logger, f"--trainer.default_root_dir={tmp_path}"])


def logged_columns(tmp_path: Path) -> set[str]:
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k for row in rows for k, v in row.items() if v != ""}


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"clip_by_value.yaml", "clip_by_norm.yaml", "clip_by_global_norm.yaml", "monitor.yaml", "combined.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_example_config_parses_and_trains(tmp_path, config):
    entries = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    cli = run_cli(tmp_path, "--config", str(config))
    ours = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("gradclip_plugin")]
    # the callbacks of the file, in its order, with its init_args
    assert [type(cb).__name__ for cb in ours] == [e["class_path"].rsplit(".", 1)[1] for e in entries]
    for cb, entry in zip(ours, entries):
        for key, value in (entry.get("init_args") or {}).items():
            assert getattr(cb, key) == (float(value) if key == "norm_type" else value), key
    assert cli.trainer.global_step == 3
    columns = logged_columns(tmp_path)
    for cb in ours:
        if isinstance(cb, GradientClipCallback):  # SkipSpikes has no threshold before its window is half full
            last = "skipped_steps" if isinstance(cb, SkipSpikes) else "threshold"
            assert {f"{cb._key_prefix}/norm", f"{cb._key_prefix}/norm_clipped", f"{cb._key_prefix}/{last}"} <= columns
        if isinstance(cb, GradientNormMonitor):
            assert {f"{cb.log_prefix}/total", f"{cb.log_prefix}/rnn", f"{cb.log_prefix}/head"} <= columns
    # the same file is a valid GRADCLIP_CONFIG: the zero-code route builds the same callbacks
    assert [type(cb) for cb in load_callbacks(config)] == [type(cb) for cb in ours]


def test_without_callbacks_nothing_is_clipped(tmp_path):
    cli = run_cli(tmp_path)
    assert not [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("gradclip_plugin")]
    assert not {c for c in logged_columns(tmp_path) if c.startswith("grad")}


def bad_config(tmp_path: Path, init_args: str, class_path: str = "gradclip_plugin.ClipByGlobalNorm") -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args: {init_args}\n")
    return str(path)


@pytest.mark.parametrize(
    "init_args, class_path, message",
    [
        ("{max_norm: -1}", "gradclip_plugin.ClipByGlobalNorm", "`max_norm` must be a positive finite number, got -1.0"),
        ("{max_norm: 1.0, norm_type: 0}", "gradclip_plugin.ClipByNorm", "`norm_type` must be a positive number or 'inf', got 0"),
        ("{clip_value: .nan}", "gradclip_plugin.ClipByValue", "`clip_value` must be a positive finite number, got nan"),
        ("{group_depth: 0}", "gradclip_plugin.GradientNormMonitor", "group_depth"),
        ("{max_norm: 1.0, nonfinite: sometimes}", "gradclip_plugin.ClipByGlobalNorm", 'Parser key "nonfinite"'),
        ("{max_norm: abc}", "gradclip_plugin.ClipByGlobalNorm", 'Parser key "max_norm"'),
    ],
)
def test_bad_yaml_value_stops_the_cli_naming_the_argument(tmp_path, capsys, init_args, class_path, message):
    with pytest.raises((ValueError, SystemExit)) as info:
        run_cli(tmp_path, "--config", bad_config(tmp_path, init_args, class_path))
    shown = str(info.value) + capsys.readouterr().err
    assert message in shown


def _clips(entry: dict) -> bool:
    module, name = entry["class_path"].rsplit(".", 1)
    return issubclass(getattr(importlib.import_module(module), name), GradientClipCallback)


CLIPPING = [p for p in CONFIGS if any(_clips(e) for e in yaml.safe_load(p.read_text())["trainer"]["callbacks"])]


@pytest.mark.parametrize("config", CLIPPING, ids=[p.stem for p in CLIPPING])
def test_every_clipping_config_trains_the_example_model_to_its_full_length(tmp_path, config):
    # the example's own 300 steps on its own data: a finite validation loss well under the mean
    # predictor's (about 2.0), where the same model unclipped never gets below it
    cli = train.main(["fit", "--config", str(config), "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                      "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
                      f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert cli.trainer.global_step == 300
    skips = [[s.global_step for s in cb.skipped] for cb in cli.trainer.callbacks if isinstance(cb, SkipSpikes)]
    assert skips == ([[63, 133]] if config.stem == "skip_spikes" else [])  # as skip_spikes.yaml's comment says
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 1.5, metrics
