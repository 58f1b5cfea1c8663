"""The zero-code route: the callbacks_factory entry point and GRADCLIP_CONFIG."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import LearningRateMonitor

from gradclip_plugin.callbacks import ClipByGlobalNorm, ClipByValue, ClipStats, GradientClipCallback
from gradclip_plugin.callbacks.monitor import GradientNormMonitor
from gradclip_plugin.functional import scale_
from gradclip_plugin.plugin import ENV_VAR, GradclipConfigError, callbacks_factory, load_callbacks

ROOT = Path(__file__).resolve().parents[1]

LIST = """\
- class_path: gradclip_plugin.callbacks.monitor.GradientNormMonitor
  init_args:
    norm_type: inf
    group_depth: parameter
- class_path: gradclip_plugin.ClipByGlobalNorm
  init_args:
    max_norm: 0.5
"""


def write(tmp_path: Path, text: str, name: str = "gradclip.yaml", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding=encoding)
    return path


class ClipToHalfTheNorm(GradientClipCallback):
    """The README's example rule: its own argument, the base class's through ``**kwargs``."""

    def __init__(self, max_norm: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def clip_(self, grads, params, step):
        coef = (step.norm <= self.max_norm).float() * 0.5 + 0.5
        scale_(grads, coef)
        return ClipStats(step.norm, step.norm * coef, self.max_norm, coef < 1)


# --- the file -------------------------------------------------------------------------------------


def test_list_of_entries_in_order(tmp_path):
    monitor, clip = load_callbacks(write(tmp_path, LIST))
    assert isinstance(monitor, GradientNormMonitor)
    assert monitor.norm_type == float("inf") and monitor.group_depth == "parameter"
    assert isinstance(clip, ClipByGlobalNorm) and clip.max_norm == 0.5


def test_lightning_cli_config_and_single_entry_and_short_names(tmp_path):
    cli = write(tmp_path, """\
        trainer:
          max_steps: 10
          callbacks:
            - class_path: ClipByValue
              init_args: {clip_value: 2.0}
            - class_path: LearningRateMonitor
        model:
          lr: 0.1
        """)
    clip, lr = load_callbacks(cli)
    assert isinstance(clip, ClipByValue) and clip.clip_value == 2.0
    assert isinstance(lr, LearningRateMonitor)
    (single,) = load_callbacks(write(tmp_path, "class_path: gradclip_plugin.ClipByGlobalNorm\ninit_args: {max_norm: 3}\n"))
    assert isinstance(single, ClipByGlobalNorm) and single.max_norm == 3.0


def test_each_call_builds_new_callbacks(tmp_path):
    path = write(tmp_path, LIST)
    first, second = load_callbacks(path), load_callbacks(path)
    assert all(a is not b for a, b in zip(first, second))


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "expected a non-empty list of `class_path`/`init_args` entries .* got an empty file"),
        ("trainer:\n  callbacks:\n", "got a file whose `trainer.callbacks` is null: list at least one callback"),
        ("trainer: {callbacks: null}\nmodel: {lr: 0.1}\n", "`trainer.callbacks` is null: list at least one callback"),
        ("trainer: {callbacks: []}\n", "got a file whose `trainer.callbacks` is an empty list: list at least one"),
        ("[]\n", "got an empty list"),
        ("max_norm: 1.0\n", r"got a mapping with keys \['max_norm'\]"),
        ("- [unclosed\n", "not valid YAML"),
        ("- ClipByGlobalNorm\n", "entry 1: expected a mapping with a `class_path` string, got 'ClipByGlobalNorm'"),
        ("- class_path: gradclip_plugin.ClipByGlobalNorm\n  init_arg: {max_norm: 1}\n",
         r"entry 1: unknown key\(s\) \['init_arg'\] next to `class_path`"),
        ("- class_path: gradclip_plugin.ClipByGlobalNorm\n  init_args: 1.0\n", "`init_args` must be a mapping"),
        ("- class_path: gradclip_plugin.ClipByGlobalNormm\n", "unknown class `class_path: gradclip_plugin.ClipByGlobalNormm`"),
        ("- class_path: ClipEverything\n", "unknown class `class_path: ClipEverything`"),
        ("- class_path: no_such_module.Clip\n", "cannot import module 'no_such_module'"),
        ("- class_path: torch.nn.Linear\n", "`class_path: torch.nn.Linear` is not a pytorch_lightning Callback class"),
        ("- class_path: gradclip_plugin.ClipByGlobalNorm\n  init_args: {max_norm: -1}\n",
         r"entry 1 \(gradclip_plugin.ClipByGlobalNorm\): `max_norm` must be a positive finite number, got -1"),
        ("- class_path: gradclip_plugin.ClipByGlobalNorm\n  init_args: {max_nrom: 1}\n",
         r"entry 1 \(gradclip_plugin.ClipByGlobalNorm\): ClipByGlobalNorm has no argument `max_nrom`; its arguments are `max_norm`, "),
        ("- class_path: gradclip_plugin.ClipByGlobalNorm\n", r"entry 1 \(gradclip_plugin.ClipByGlobalNorm\): the following arguments are required: max_norm"),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(GradclipConfigError, match=match) as info:
        load_callbacks(path)
    assert f"GRADCLIP_CONFIG={str(path)!r}" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(GradclipConfigError, match="no such file") as info:
        load_callbacks(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(GradclipConfigError, match=f"{ENV_VAR}=.*: cannot read the file") as info:
        load_callbacks(tmp_path)  # a directory
    assert str(tmp_path) in str(info.value)


def test_a_file_not_in_utf8_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = write(tmp_path, LIST, encoding="utf-16")  # PowerShell's default for `>` and `Out-File`
    with pytest.raises(GradclipConfigError, match=r"cannot read the file: .utf-8. codec can.t decode.*; it must be UTF-8: re-save it as UTF-8") as info:
        load_callbacks(path)
    assert f"GRADCLIP_CONFIG={str(path)!r}" in str(info.value)


def test_a_module_that_fails_to_import_is_named_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rules.py").write_text("raise RuntimeError('a bug in the module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, "- class_path: broken_rules.Clip\n")
    match = r"entry 1: cannot import module 'broken_rules' of `class_path: broken_rules.Clip`: a bug in the module"
    with pytest.raises(GradclipConfigError, match=match) as info:
        load_callbacks(path)
    assert f"GRADCLIP_CONFIG={str(path)!r}" in str(info.value)


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    assert len(load_callbacks(write(tmp_path, LIST, encoding="utf-8-sig"))) == 2


# --- the factory ----------------------------------------------------------------------------------


def test_entry_point_is_registered():
    (ep,) = [e for e in entry_points(group="pytorch_lightning.callbacks_factory") if e.name == "gradclip"]
    assert ep.load() is callbacks_factory


def test_factory_unset_or_empty_adds_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert callbacks_factory() == []
    monkeypatch.setenv(ENV_VAR, "  ")
    assert callbacks_factory() == []
    monkeypatch.setenv(ENV_VAR, str(write(tmp_path, LIST)))
    assert [type(cb) for cb in callbacks_factory()] == [GradientNormMonitor, ClipByGlobalNorm]


# --- every Trainer of a process, in a subprocess --------------------------------------------------

SCRIPT = """
import csv, os, sys
sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from helpers import TinyModel, make_loader

class Model(TinyModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss

trainer = pl.Trainer(max_steps=2, log_every_n_steps=1, logger=CSVLogger({out!r}, name="run", version=0),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
print("CALLBACKS", [type(cb).__name__ for cb in trainer.callbacks if type(cb).__module__.startswith("gradclip")])
trainer.fit(Model(), make_loader())
with open({out!r} + "/run/version_0/metrics.csv") as f:
    print("COLUMNS", sorted(k for k in next(csv.DictReader(f)) if k.startswith("grad")))
if len(sys.argv) > 1:  # then a Trainer created after pointing the variable at a missing file
    os.environ["GRADCLIP_CONFIG"] = sys.argv[1]
    pl.Trainer(logger=False)
"""


def run_script(tmp_path: Path, config: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if config is not None:
        env[ENV_VAR] = config
    script = SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "logs"))
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)


def test_subprocess_with_config_every_trainer_gets_the_callbacks(tmp_path):
    result = run_script(tmp_path, str(write(tmp_path, LIST)))
    assert result.returncode == 0, result.stderr
    assert "CALLBACKS ['GradientNormMonitor', 'ClipByGlobalNorm']" in result.stdout
    assert (
        "COLUMNS ['grad_clip/clip_rate', 'grad_clip/nonfinite_steps', 'grad_clip/norm', 'grad_clip/norm_clipped', "
        "'grad_clip/norm_max', 'grad_clip/threshold', 'grad_norm/encoder.bias', 'grad_norm/encoder.weight', "
        "'grad_norm/head.bias', 'grad_norm/head.weight', 'grad_norm/nonfinite_steps', 'grad_norm/total', "
        "'grad_norm/total_max']"
    ) in result.stdout


def test_subprocess_without_config_adds_nothing_and_a_missing_file_stops_the_trainer(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    result = run_script(tmp_path, None, missing)
    assert "CALLBACKS []" in result.stdout
    assert "COLUMNS []" in result.stdout
    assert result.returncode != 0
    assert "GradclipConfigError" in result.stderr and f"GRADCLIP_CONFIG={missing!r}: no such file" in result.stderr


# --- values as LightningCLI reads them -------------------------------------------------------------


def test_values_are_converted_as_lightning_cli_converts_them(tmp_path):
    (clip,) = load_callbacks(write(tmp_path, '- class_path: ClipByGlobalNorm\n  init_args: {max_norm: "1.0", norm_type: inf}\n'))
    assert clip.max_norm == 1.0 and clip.norm_type == float("inf")


def test_a_value_of_the_wrong_type_is_refused_naming_the_argument_and_the_type(tmp_path):
    path = write(tmp_path, '- class_path: ClipByGlobalNorm\n  init_args: {max_norm: "one"}\n')
    with pytest.raises(GradclipConfigError, match=r'entry 1 \(ClipByGlobalNorm\): .*"max_norm".*float.*one'):
        load_callbacks(path)


@pytest.mark.parametrize("jsonargparse", [True, False])
def test_a_rule_with_kwargs_takes_the_arguments_of_its_base_classes(tmp_path, monkeypatch, jsonargparse):
    if not jsonargparse:
        monkeypatch.setitem(sys.modules, "jsonargparse", None)
    class_path = f"{__name__}.ClipToHalfTheNorm"  # this module, as pytest imported it
    path = write(tmp_path, f"- class_path: {class_path}\n  init_args: {{max_norm: 2.0, log_prefix: half, nonfinite: zero}}\n")
    (rule,) = load_callbacks(path)
    assert isinstance(rule, ClipToHalfTheNorm) and (rule.max_norm, rule.log_prefix, rule.nonfinite) == (2.0, "half", "zero")
    path = write(tmp_path, f"- class_path: {class_path}\n  init_args: {{max_norm: 2.0, log_prefx: half}}\n")
    with pytest.raises(GradclipConfigError, match=r"ClipToHalfTheNorm has no argument `log_prefx`; its arguments are `max_norm`, .*`log_prefix`"):
        load_callbacks(path)


def test_without_jsonargparse_the_message_names_the_expected_type(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # `import jsonargparse` raises ImportError
    path = write(tmp_path, '- class_path: ClipByGlobalNorm\n  init_args: {max_norm: "1.0"}\n')
    with pytest.raises(GradclipConfigError, match=r"got '1.0' \(expected `max_norm`: float\)"):
        load_callbacks(path)
