"""The zero-code route: callbacks for every ``Trainer`` from a YAML file named by ``GRADCLIP_CONFIG``.

The package registers :func:`callbacks_factory` under the entry-point group
``pytorch_lightning.callbacks_factory`` and :func:`lightning_callbacks_factory` under
``lightning.pytorch.callbacks_factory``; Lightning calls every factory of its group when a
``Trainer`` is created and appends what it returns to ``Trainer(callbacks=...)``. So::

    GRADCLIP_CONFIG=gradclip.yaml python train.py

adds the callbacks listed in ``gradclip.yaml`` to every Trainer of ``train.py`` without a line of
it changed. The file holds what ``trainer.callbacks`` holds in a LightningCLI config::

    - class_path: gradclip_plugin.GradientNormMonitor
    - class_path: gradclip_plugin.ClipByGlobalNorm
      init_args:
        max_norm: 1.0

A whole LightningCLI config (a mapping with ``trainer: callbacks: [...]``) is accepted too, so
the files in ``examples/configs/`` work both ways. With ``GRADCLIP_CONFIG`` unset or empty nothing
is added. The arguments are checked and converted as LightningCLI does (by jsonargparse, where it
is installed: ``max_norm: "1.0"`` is a float there too).
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from typing import Any

from gradclip_plugin.callbacks import _lightning as lightning

__all__ = ["ENV_VAR", "GradclipConfigError", "callbacks_factory", "lightning_callbacks_factory", "load_callbacks"]

#: the environment variable naming the YAML file
ENV_VAR = "GRADCLIP_CONFIG"

_EXAMPLE = "- class_path: gradclip_plugin.ClipByGlobalNorm\n  init_args:\n    max_norm: 1.0"


class GradclipConfigError(*lightning.MISCONFIGURATION_BASES):  # type: ignore[misc]
    """The file named by ``GRADCLIP_CONFIG`` cannot be turned into callbacks (a ``MisconfigurationException``
    of both Lightning namespaces)."""


def callbacks_factory() -> list[Any]:
    """Entry point of ``pytorch_lightning.callbacks_factory``: the callbacks of ``$GRADCLIP_CONFIG``, or ``[]``.

    Raises:
        GradclipConfigError: if the variable is set and the file is missing, unreadable or malformed,
            or names a class that cannot be imported or built.
    """
    path = os.environ.get(ENV_VAR, "").strip()
    return load_callbacks(path) if path else []


def lightning_callbacks_factory() -> list[Any]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: as :func:`callbacks_factory`, for the unified package."""
    path = os.environ.get(ENV_VAR, "").strip()
    return load_callbacks(path, "lightning.pytorch") if path else []


def load_callbacks(path: str | os.PathLike, namespace: str = "pytorch_lightning") -> list[Any]:
    """Build the callbacks listed in the YAML file ``path`` (``class_path``/``init_args`` entries).

    Args:
        path: a YAML file holding a list of ``{class_path, init_args}`` entries, one such entry, or a
            LightningCLI config with ``trainer: callbacks:``.
        namespace: the Lightning namespace of the Trainer (``"pytorch_lightning"`` or
            ``"lightning.pytorch"``): a bare class name is looked up in ``gradclip_plugin``, then in
            its ``callbacks``.

    Returns:
        One new callback per entry, in file order.

    Raises:
        GradclipConfigError: naming the file (and the entry) and what to fix.
    """
    import yaml

    shown = os.fspath(path)
    where = f"{ENV_VAR}={shown!r}"
    file = os.path.expandvars(os.path.expanduser(shown))
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise GradclipConfigError(f"{where}: no such file (looked for {os.path.abspath(file)!r}). Set {ENV_VAR} to the path "
                                  f"of a YAML file of callbacks, or unset it.") from None
    except (OSError, ValueError) as err:  # ValueError: UnicodeDecodeError (PowerShell's `>` writes UTF-16), a NUL
        fix = "; it must be UTF-8: re-save it as UTF-8 (`Out-File -Encoding utf8`)" if isinstance(err, UnicodeError) else ""
        raise GradclipConfigError(f"{where}: cannot read the file: {err}{fix}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise GradclipConfigError(f"{where}: not valid YAML: {err}") from None
    return [_build(entry, f"{where}, entry {i}", namespace) for i, entry in enumerate(_entries(data, where), 1)]


def _entries(data: Any, where: str) -> list[Any]:
    if isinstance(data, dict) and "class_path" in data:
        return [data]
    got = "an empty file" if data is None else _describe(data)
    if isinstance(data, dict) and isinstance(data.get("trainer"), dict) and "callbacks" in data["trainer"]:
        data = data["trainer"]["callbacks"]
        got = f"a file whose `trainer.callbacks` is {_describe(data)}"
    if isinstance(data, list) and data:
        return data
    raise GradclipConfigError(f"{where}: expected a non-empty list of `class_path`/`init_args` entries (the form of "
                              f"`trainer.callbacks` in a LightningCLI config), got {got}: list at least one callback. "
                              f"For example:\n{_EXAMPLE}")


def _build(entry: Any, where: str, namespace: str) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get("class_path"), str):
        raise GradclipConfigError(f"{where}: expected a mapping with a `class_path` string, got {entry!r}")
    unknown = sorted(set(entry) - {"class_path", "init_args"})
    if unknown:
        raise GradclipConfigError(f"{where}: unknown key(s) {unknown} next to `class_path`; "
                                  "only `class_path` and `init_args` are read")
    class_path = entry["class_path"]
    init_args = entry.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise GradclipConfigError(f"{where} ({class_path}): `init_args` must be a mapping, got {init_args!r}")
    cls = _resolve(class_path, where, namespace)
    where = f"{where} ({class_path})"
    params = _arguments(cls)
    unknown = [k for k in init_args if k not in params]
    if unknown:
        raise GradclipConfigError(f"{where}: {cls.__name__} has no argument `{unknown[0]}`; its arguments are "
                                  + ", ".join(f"`{k}`" for k in params))
    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # the constructor checks the values alone
        try:
            return cls(**init_args)
        except Exception as err:  # TypeError, the constructor's ValueError: as jsonargparse's route below
            expected = ", ".join(f"`{k}`: {params[k].annotation}" for k in init_args)
            raise GradclipConfigError(f"{where}: {err} (expected {expected})") from err
    parser = ArgumentParser(exit_on_error=False)
    with warnings.catch_warnings():  # its deprecation notices are not the user's business
        warnings.simplefilter("ignore")
        try:  # the types converted and checked as LightningCLI does, then the constructor's own checks
            parser.add_class_arguments(cls, "init")
            return getattr(parser, "instantiate", parser.instantiate_classes)(parser.parse_object({"init": init_args})).init
        except Exception as err:  # jsonargparse's ArgumentError, the constructor's ValueError
            message = str(err).replace('"init.', '"').replace("init.", "").replace("\n", " ")
            raise GradclipConfigError(f"{where}: {' '.join(message.split())}") from err


def _arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The named arguments of ``cls``, following ``**kwargs`` up the MRO to the base classes' ``__init__`` as
    LightningCLI (jsonargparse) does."""
    params: dict[str, inspect.Parameter] = {}
    for base in cls.__mro__:  # a class without its own `__init__` repeats the next one's: nothing changes
        found = list(inspect.signature(base.__init__).parameters.values())[1:]  # without `self`
        params.update({p.name: p for p in found if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in params})
        if all(p.kind is not p.VAR_KEYWORD for p in found):
            break
    return params


def _resolve(class_path: str, where: str, namespace: str) -> type:
    modules = ("gradclip_plugin", f"{namespace}.callbacks")
    candidates = [tuple(class_path.rsplit(".", 1))] if "." in class_path else [(m, class_path) for m in modules]
    for module_name, name in candidates:
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except Exception as err:  # ImportError, or the module's own error
            if "." in class_path:
                raise GradclipConfigError(f"{where}: cannot import module {module_name!r} "
                                          f"of `class_path: {class_path}`: {err}") from err
            continue
        if cls is None:
            continue
        callback = importlib.import_module(f"{namespace}.callbacks").Callback
        if not (isinstance(cls, type) and issubclass(cls, callback)):
            raise GradclipConfigError(f"{where}: `class_path: {class_path}` is not a {namespace} Callback class")
        return cls
    raise GradclipConfigError(f"{where}: unknown class `class_path: {class_path}`. Give the full import path, e.g. "
                              "`gradclip_plugin.ClipByGlobalNorm`.")


def _describe(data: Any) -> str:
    if data is None:
        return "null"
    if isinstance(data, list):
        return "an empty list"
    if isinstance(data, dict):
        return f"a mapping with keys {sorted(map(str, data))}"
    return f"{type(data).__name__} {data!r}"
