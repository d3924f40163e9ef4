"""tunetop's engine: LoRA fine-tuning on MLX as a library and as a headless process.

Library use follows mlx-swift-lm's ``LoRATrain``::

    from tunetop import train, evaluate, TrainingParameters, Disposition, apply_fine_tuning

Importing this package loads an optimized BLAS first on Linux (see ``tunetop.blas``); the
modules that need mlx are imported lazily, so ``tunetop.control.protocol`` and ``tunetop.training.config`` work
on machines without MLX.
"""

from __future__ import annotations

from typing import Any

from tunetop.blas import preload_optimized_blas

preload_optimized_blas(warn=False)

_LAZY = {
    "train": "training.trainer",
    "evaluate": "training.trainer",
    "default_loss": "training.trainer",
    "TrainingParameters": "training.trainer",
    "Disposition": "training.trainer",
    "Train": "training.trainer",
    "Validation": "training.trainer",
    "Save": "training.trainer",
    "Trainer": "training.trainer",
    "apply_fine_tuning": "training.adapters",
    "save_adapters": "training.adapters",
    "load_adapters": "training.adapters",
    "load_splits": "training.data",
    "load_config": "training.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'tunetop' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, "load" if name == "load_config" else name)
