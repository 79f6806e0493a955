"""Plugins: Python modules or files that register strategies, block transforms and block
optimizers, so recipes, ``--strategy`` and ``quantkit recipe check`` can use them by name.

A plugin is named by a module (``"my_methods"``, importable from ``sys.path``) or a file
(``"path/to/methods.py"``, anything ending in ``.py`` or holding a ``/``). Loading it imports
it once: its ``@register_strategy`` / ``@register_transform`` / ``@register_optimizer``
decorators run. Any failure (a missing file, an exception while importing, a name already
taken) is one :class:`~quantkit.errors.PluginError` line, and the plugin's partial
registrations are undone.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .blocks.base import OPTIMIZERS, TRANSFORMS
from .errors import PluginError, QuantkitError
from .strategies import STRATEGIES

#: Loaded plugins: module name → the plugin as loaded (a module name, or a file's absolute path).
LOADED: dict[str, str] = {}

_TABLES: tuple[dict[str, Any], ...] = (STRATEGIES, TRANSFORMS, OPTIMIZERS)
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_file_plugin(plugin: str) -> bool:
    return plugin.endswith(".py") or "/" in plugin or "\\" in plugin


def resolve(plugin: str, base: str | Path | None = None) -> str:
    """The canonical name of ``plugin``: a module name as given; a file's absolute path
    (a relative path is taken from ``base``, e.g. the recipe's folder, else the working dir)."""
    if not isinstance(plugin, str) or not plugin.strip():
        raise PluginError(f"plugin {plugin!r} must be a module name or a .py file path")
    plugin = plugin.strip()
    if not is_file_plugin(plugin):
        if not _MODULE.fullmatch(plugin):
            raise PluginError(f"plugin {plugin!r} is neither a module name nor a .py file path")
        return plugin
    path = Path(plugin).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path.absolute())


def load_plugin(plugin: str, base: str | Path | None = None) -> str:
    """Import ``plugin`` once (see the module docstring); returns its canonical name."""
    key = resolve(plugin, base)
    if is_file_plugin(key):
        path = Path(key)
        if not path.is_file():
            where = f" (relative to {base})" if base is not None and not Path(plugin).is_absolute() else ""
            raise PluginError(f"plugin file {plugin}{where} does not exist; check the path")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        name = f"quantkit_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    else:
        name = key
    if name in LOADED:
        return key
    saved = [dict(t) for t in _TABLES]
    try:
        if is_file_plugin(key):
            _exec_file(name, Path(key))
        else:
            importlib.import_module(name)
    except BaseException as exc:
        for table, before in zip(_TABLES, saved):
            table.clear()
            table.update(before)
        if is_file_plugin(key):
            sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PluginError(_why(plugin, key, name, exc)) from None
    LOADED[name] = key
    return key


def load_plugins(plugins: Iterable[str], base: str | Path | None = None) -> tuple[str, ...]:
    """:func:`load_plugin` each of ``plugins``, in order; their canonical names."""
    return tuple(load_plugin(p, base) for p in plugins)


def origin(cls: type) -> str:
    """Where a registered class comes from: ``"built-in"`` (quantkit itself), the plugin that
    defined it (module name or file path), or the module that registered it from Python."""
    module = cls.__module__
    if module == "quantkit" or module.startswith("quantkit."):
        return "built-in"
    for name, key in LOADED.items():
        if module == name or module.startswith(name + "."):
            return key
    return module


def _exec_file(name: str, path: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _why(plugin: str, key: str, name: str, exc: BaseException) -> str:
    if isinstance(exc, QuantkitError):
        return f"plugin {plugin}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name == name.split(".")[0]:
        return (f"plugin module {plugin!r} cannot be imported (no module named {exc.name!r}); "
                "install it, add its folder to PYTHONPATH, or pass its .py file")
    lines = str(exc).strip().splitlines()
    where = ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f", line {exc.lineno}"
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if f.filename == key or Path(f.filename).stem == name.rsplit(".", 1)[-1]]
        if frames:
            where = f", line {frames[-1].lineno}"
    return (f"plugin {plugin} failed to import ({type(exc).__name__}: "
            f"{lines[0] if lines else ''}{where}); fix the plugin")
