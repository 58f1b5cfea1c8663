"""Bad input is refused early, naming the argument and the value.

* ``__init__``: a table of every argument of ``ClipByValue``, ``ClipByNorm`` and ``ClipByGlobalNorm``
  with bad values and the exact message each gives (``ValueError``), and the good values accepted.
* LightningCLI (a minimal one, ``run=False``): typos, wrong types and bad values in YAML are refused
  with the argument's name in the message; the YAML spellings of the inf-norm are accepted.
* ``setup``: DeepSpeed is refused with a pointer to DeepSpeed's own ``gradient_clipping``.
"""

from __future__ import annotations

import math
import re
import sys
from argparse import ArgumentError
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from gradclip_plugin import ClipByGlobalNorm, ClipByNorm, ClipByValue
from helpers import TinyModel, make_trainer

INF, NAN = math.inf, math.nan
POLICIES = "['skip', 'error', 'zero', 'ignore']"

# the required arguments of each class, valid
REQUIRED: dict[type, dict[str, Any]] = {
    ClipByValue: {"clip_value": 0.5},
    ClipByNorm: {"max_norm": 1.0},
    ClipByGlobalNorm: {"max_norm": 1.0},
}
CLASSES = list(REQUIRED)


def positive(name: str, none: bool = False) -> list[tuple[str, Any, str]]:
    """Bad values of a positive finite number ``name`` (``None`` allowed if ``none``) and their messages;
    a 0-dim tensor or a NumPy scalar is checked as the number it holds."""
    bad = [0, 0.0, -1, -1.0, NAN, INF, -INF, True, False, "1", [1.0], torch.tensor(-1.0), torch.tensor(NAN),
           torch.tensor([1.0]), torch.tensor(True), np.float64(0.0), np.int64(-2)] + ([] if none else [None])  # fmt: skip
    return [(name, v, f"`{name}` must be a positive finite number{' or None' if none else ''}, got {v!r}") for v in bad]


NORM_TYPE_BAD = [
    ("norm_type", v, f"`norm_type` must be a positive number or 'inf', got {v!r}")
    for v in (0, 0.0, -2.0, -INF, NAN, "abc", "-inf", "", True, None, [2.0])
]

COMMON_BAD = (
    [
        (name, v, f"`{name}` must be a list of fnmatch patterns such as ['encoder.*'], got {v!r}")
        for name in ("include", "exclude")
        for v in ("encoder.*", 5, [1], ["encoder.*", None], [["encoder.*"]])
    ]
    + [("nonfinite", v, f"`nonfinite` must be one of {POLICIES}, got {v!r}") for v in ("Skip", "nan", "", None, 1)]
    + [("log_prefix", v, f"`log_prefix` must be a non-empty string, got {v!r}") for v in ("", 3, None, ["a"])]
    + [
        ("group_depth", v, f"`group_depth` must be a positive int, 'auto' or 'parameter', got {v!r}")
        for v in (0, -1, 1.5, True, "module", "")
    ]
)

# (class, argument, bad value, exact message): every argument of every class
TABLE = (
    [(ClipByValue, *row) for row in positive("clip_value")]
    + [(cls, *row) for cls in (ClipByNorm, ClipByGlobalNorm) for row in positive("max_norm")]
    + [(cls, *row) for cls in (ClipByNorm, ClipByGlobalNorm) for row in NORM_TYPE_BAD]
    + [(cls, *row) for cls in CLASSES for row in COMMON_BAD]
    + [(cls, *row) for cls in (ClipByNorm, ClipByGlobalNorm) for row in positive("skip_above", none=True)]
    + [
        (cls, "max_consecutive_skips", v, f"`max_consecutive_skips` must be a positive integer or None, got {v!r}")
        for cls in CLASSES
        for v in (0, -1, 1.5, True, "3", torch.tensor(0), np.int64(0), INF)
    ]
    + [
        (cls, "report_every_n_steps", v, f"`report_every_n_steps` must be a positive integer or None, got {v!r}")
        for cls in CLASSES
        for v in (0, -5, 2.0, False, "10")
    ]
    + [
        (cls, "skip_above", v, f"`skip_above` must be above `max_norm` (1.0): steps above it are skipped, those between are clipped; got {float(v)!r}")
        for cls in (ClipByNorm, ClipByGlobalNorm)
        for v in (0.5, 1.0, 1)
    ]
)


def _id(row) -> str:
    cls, arg, value, _ = row
    return f"{cls.__name__}-{arg}={value!r}"


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_init_refuses_bad_values_naming_argument_and_value(row):
    cls, arg, value, message = row
    kwargs = {**REQUIRED[cls], arg: value}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kwargs)


def test_table_covers_every_init_argument():
    import inspect

    for cls in CLASSES:
        args = set(inspect.signature(cls.__init__).parameters) - {"self"}
        covered = {arg for c, arg, _, _ in TABLE if c is cls}
        assert args == covered, f"{cls.__name__}: no bad-value row for {sorted(args - covered)}"


GOOD = [
    (ClipByValue, {"clip_value": 3}, {"clip_value": 3.0}),
    (ClipByValue, {"clip_value": 1e-12}, {"clip_value": 1e-12}),
    (ClipByNorm, {"max_norm": 2, "norm_type": 1}, {"max_norm": 2.0, "norm_type": 1.0}),
    (ClipByNorm, {"max_norm": 1.0, "norm_type": 0.5}, {"norm_type": 0.5}),
    (ClipByGlobalNorm, {"max_norm": 1.0, "norm_type": "inf"}, {"norm_type": INF}),
    (ClipByGlobalNorm, {"max_norm": 1.0, "norm_type": INF}, {"norm_type": INF}),
    (ClipByGlobalNorm, {"max_norm": 1.0, "include": ("encoder.*",)}, {"include": ["encoder.*"]}),
    (ClipByGlobalNorm, {"max_norm": 1.0, "include": None, "exclude": None}, {"include": [], "exclude": []}),
    (ClipByGlobalNorm, {"max_norm": 1.0, "skip_above": 100}, {"skip_above": 100.0}),
    (ClipByNorm, {"max_norm": 1.0, "skip_above": 1.5}, {"skip_above": 1.5}),
    (ClipByNorm, {"max_norm": 1.0}, {"skip_above": None}),
] + [(ClipByGlobalNorm, {"max_norm": 1.0, "nonfinite": p}, {"nonfinite": p}) for p in ("skip", "error", "zero", "ignore")]


@pytest.mark.parametrize("cls, kwargs, stored", GOOD, ids=[f"{c.__name__}-{k}" for c, k, _ in GOOD])
def test_init_accepts_good_values(cls, kwargs, stored):
    cb = cls(**kwargs)
    for name, value in stored.items():
        assert getattr(cb, name) == value and type(getattr(cb, name)) is type(value)


# ---------------------------------------------------------------------- LightningCLI
def run_cli(tmp_path, class_path: str, init_args: str):
    """A minimal LightningCLI on ``TinyModel`` with one callback from YAML; nothing is run."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  callbacks:\n"
        f"    - class_path: {class_path}\n      init_args:\n"
        + "".join(f"        {line}\n" for line in init_args.splitlines())
    )
    yaml.safe_load(config.read_text())  # the test's own YAML is well formed
    with mock.patch.object(sys, "argv", ["train.py"]):  # pytest's own arguments are not the CLI's
        return LightningCLI(
            TinyModel,
            run=False,
            args=["--config", str(config)],
            parser_kwargs={"exit_on_error": False},
            save_config_callback=None,
        )


CLI_BAD = [
    # typos in argument names: the misspelt name is quoted
    ("gradclip_plugin.ClipByGlobalNorm", "max_nrom: 1.0", "max_nrom"),
    ("gradclip_plugin.ClipByGlobalNorm", "max_norm: 1.0\nnorm_typ: 2.0", "norm_typ"),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nincludes: [encoder.*]", "includes"),
    ("gradclip_plugin.ClipByValue", "clip_val: 0.5", "clip_val"),
    ("gradclip_plugin.ClipByValue", "clip_value: 0.5\nnon_finite: skip", "non_finite"),
    ("gradclip_plugin.ClipByValue", "clip_value: 0.5\nlogprefix: clip", "logprefix"),
    # a misspelt class
    ("gradclip_plugin.ClipByGlobalNrom", "max_norm: 1.0", "ClipByGlobalNrom"),
    # wrong types: the argument's parser key is named
    ("gradclip_plugin.ClipByGlobalNorm", "max_norm: big", 'Parser key "max_norm"'),
    ("gradclip_plugin.ClipByValue", "clip_value: true", 'Parser key "clip_value"'),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nnorm_type: abc", 'Parser key "norm_type"'),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\ninclude: encoder.*", 'Parser key "include"'),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nexclude: {a: 1}", 'Parser key "exclude"'),
    ("gradclip_plugin.ClipByGlobalNorm", "max_norm: 1.0\nnonfinite: skipp", 'Parser key "nonfinite"'),
    ("gradclip_plugin.ClipByValue", "clip_value: 0.5\nlog_prefix: 3", 'Parser key "log_prefix"'),
    # right type, bad value: the callback's own message
    ("gradclip_plugin.ClipByGlobalNorm", "max_norm: -1", "`max_norm` must be a positive finite number, got -1.0"),
    ("gradclip_plugin.ClipByValue", "clip_value: .nan", "`clip_value` must be a positive finite number, got nan"),
    ("gradclip_plugin.ClipByValue", "clip_value: .inf", "`clip_value` must be a positive finite number, got inf"),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nnorm_type: 0", "`norm_type` must be a positive number or 'inf', got 0.0"),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nnorm_type: -.inf", "`norm_type` must be a positive number or 'inf', got -inf"),
    ("gradclip_plugin.ClipByGlobalNorm", "max_norm: 1.0\nskip_above: 0.5", "`skip_above` must be above `max_norm` (1.0)"),
    ("gradclip_plugin.ClipByNorm", "max_norm: 1.0\nlog_prefix: ''", "`log_prefix` must be a non-empty string, got ''"),
]


@pytest.mark.parametrize("class_path, init_args, expected", CLI_BAD, ids=[f"{c.split('.')[-1]}:{a}" for c, a, _ in CLI_BAD])
def test_cli_refuses_bad_yaml_naming_the_argument(tmp_path, class_path, init_args, expected):
    with pytest.raises((ArgumentError, ValueError)) as info:  # parse errors, then the callback's own
        run_cli(tmp_path, class_path, init_args)
    assert expected in str(info.value)


@pytest.mark.parametrize("spelling", ["inf", ".inf", "'inf'", ".Inf"])
@pytest.mark.parametrize("class_path", ["gradclip_plugin.ClipByNorm", "gradclip_plugin.ClipByGlobalNorm"])
def test_cli_accepts_the_yaml_spellings_of_the_inf_norm(tmp_path, class_path, spelling):
    # README and examples/configs document `norm_type: ... or inf`; YAML reads a bare `inf` as a string
    cli = run_cli(tmp_path, class_path, f"max_norm: 1.0\nnorm_type: {spelling}")
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == class_path.split(".")[-1]]
    assert cb.norm_type == INF


def test_cli_builds_the_configured_callback(tmp_path):
    cli = run_cli(
        tmp_path,
        "gradclip_plugin.ClipByGlobalNorm",
        "max_norm: 2\nnorm_type: 1\ninclude: [encoder.*]\nnonfinite: zero\nlog_prefix: clip",
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, ClipByGlobalNorm)]
    assert (cb.max_norm, cb.norm_type, cb.include, cb.nonfinite, cb.log_prefix) == (2.0, 1.0, ["encoder.*"], "zero", "clip")


# ---------------------------------------------------------------------- setup: DeepSpeed
@pytest.mark.parametrize("cls", CLASSES)
def test_setup_refuses_deepspeed_pointing_to_its_gradient_clipping(tmp_path, monkeypatch, cls):
    from pytorch_lightning.strategies import DeepSpeedStrategy

    cb = cls(**REQUIRED[cls])
    trainer = make_trainer(tmp_path, [cb])
    cb.setup(trainer, TinyModel(), "fit")  # the control: the same call passes on the CPU strategy
    # deepspeed is not installed, so its strategy's __init__ cannot run; setup only needs the type
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", object.__new__(DeepSpeedStrategy))
    assert isinstance(trainer.strategy, DeepSpeedStrategy)
    with pytest.raises(
        MisconfigurationException,
        match=rf"^{cls.__name__} cannot clip under DeepSpeed: the engine partitions the gradients .*"
        r"Use DeepSpeed's own `gradient_clipping` setting instead\.$",
    ):
        cb.setup(trainer, TinyModel(), "fit")
