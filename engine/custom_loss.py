"""``training.loss = "package.module:function"``: a custom loss named in a config, checked at start.

The function has the default loss's contract (engine.trainer.default_loss)::

    def loss(model, tokens, lengths, segments=None) -> (mean loss, counted tokens)

For padded batches it is called as ``loss(model, tokens, lengths)``: ``lengths`` holds
``(offset, length)`` per row. To train packed rows (engine.packing) it must accept a ``segments``
keyword: a packed row holds several examples, so it is called as ``loss(model, tokens, targets,
segments=segments)``, where ``targets`` is the 0/1 mask of the counted targets of each input
position and ``segments`` numbers each input position's example within its row (1, 2, ...; 0 =
padding): the example boundaries. ``model(inputs)`` inside it already attends within each example
and restarts positions per example.

The module part may also be a ``.py`` file (``losses.py:focal``), relative to the config's folder.
Every mistake is a :class:`~engine.config.ConfigError` naming ``training.loss``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError


def accepts_segments(loss: Callable[..., Any]) -> bool:
    """Whether ``loss`` takes the ``segments`` keyword that packed rows need."""
    try:
        parameters = inspect.signature(loss).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "segments" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _import(module_name: str, where: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}: the file {module_name} does not exist. Give a path relative to the config.")
        spec = importlib.util.spec_from_file_location(f"tunetop_loss_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(module_name)


def load_loss(spec: str, source: str = "") -> Callable[..., Any]:
    """The function ``spec`` ("package.module:function" or "file.py:function") names, checked:
    importable, callable, and callable as ``loss(model, tokens, lengths)``."""
    where = f"{source or 'config'}: training.loss = {spec!r}"
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"{where}: write it as \"package.module:function\" (or \"file.py:function\").")
    try:
        module = _import(module_name, where)
    except ConfigError:
        raise
    except Exception as error:  # ImportError, or the module itself failing: the user's code
        raise ConfigError(
            f"{where}: cannot import {module_name} ({type(error).__name__}: {error}). Install the package, "
            "add its folder to PYTHONPATH, or give a .py file."
        ) from None
    loss = getattr(module, name, None)
    if loss is None:
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"{where}: {module_name} has no {name!r}. Its functions: {', '.join(sorted(found)) or 'none'}.")
    if not callable(loss):
        raise ConfigError(f"{where}: {name!r} is a {type(loss).__name__}, not a function.")
    try:
        inspect.signature(loss).bind(None, None, None)
    except TypeError:
        raise ConfigError(
            f"{where}: {name} must accept (model, tokens, lengths), as the default loss does, and return "
            "(mean loss, counted tokens); add segments=None to train packed rows too."
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): it fails, if it does, at the first step
    return loss
