"""A seed fixes everything a run draws, whatever the process drew before (issue 16)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from tunetop.training import build as build_module
from tunetop.training import config
from tunetop.training.build import build_trainer


def _losses(tmp_path: Path, steps: int = 4) -> list[float]:
    cfg = config.parse(config.starter_text())
    cfg.lora.rank = 4
    cfg.lora.dropout = 0.1  # dropout draws too
    cfg.training.batch_size = 4
    trainer, *_ = build_trainer(cfg, tmp_path)
    return [trainer.step().loss for _ in range(steps)]


def _draw_everything() -> None:
    mx.eval(mx.random.normal((64,)), mx.random.uniform(shape=(3, 3)))
    random.random()
    np.random.rand(5)


def test_same_seed_same_losses_after_other_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run on a fresh machine builds the embedded model inside the model loader, and
    so drew from mx.random between the run's seed and the LoRA initialisation: it trained to
    other losses from iteration 2 on. Draws before and during loading must change nothing."""
    quiet = _losses(tmp_path / "quiet")

    load = build_module.load_model_and_tokenizer

    def loading_with_draws(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        _draw_everything()  # as building the embedded model in this process does
        return out

    monkeypatch.setattr(build_module, "load_model_and_tokenizer", loading_with_draws)
    mx.random.seed(987)
    _draw_everything()
    busy = _losses(tmp_path / "busy")
    assert busy == quiet  # exactly: same computation, same numbers
