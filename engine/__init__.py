"""tunetop's engine: LoRA fine-tuning on MLX as a library and as a headless process.

Library use follows mlx-swift-lm's ``LoRATrain``::

    from engine import train, evaluate, TrainingParameters, Disposition, apply_fine_tuning

Importing this package loads an optimized BLAS first on Linux (see ``engine.blas``); the
modules that need mlx are imported lazily, so ``engine.protocol`` and ``engine.config`` work
on machines without MLX.
"""

from __future__ import annotations

from typing import Any

from .blas import preload_optimized_blas

preload_optimized_blas(warn=False)

_LAZY = {
    "train": "trainer",
    "evaluate": "trainer",
    "default_loss": "trainer",
    "TrainingParameters": "trainer",
    "Disposition": "trainer",
    "Train": "trainer",
    "Validation": "trainer",
    "Save": "trainer",
    "Trainer": "trainer",
    "apply_fine_tuning": "adapters",
    "save_adapters": "adapters",
    "load_adapters": "adapters",
    "load_splits": "data",
    "load_config": "config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, "load" if name == "load_config" else name)
