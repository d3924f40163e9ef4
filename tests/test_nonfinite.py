"""Non-finite steps, with real training on the embedded model: a step whose loss, gradients or
update is NaN or infinite is undone whatever the policy, so the weights never hold NaN or
infinity; skipping gives up (a pause) after ``nonfinite_streak_limit`` such steps in a row; and
every message names only checkpoints that exist.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import resolve
from tunetop.training import config
from tunetop.training.adapters import apply_fine_tuning, trainable_weights
from tunetop.training.build import build_trainer
from tunetop.training.checkpoint import read_checkpoint
from tunetop.training.data import load_splits
from tunetop.training.trainer import (
    NonFinite,
    Save,
    SaveFailed,
    TrainingParameters,
    default_loss,
    run_loop,
    train,
)


def _weights(model: Any) -> dict[str, np.ndarray]:
    return {name: np.array(value.astype(mx.float32)) for name, value in trainable_weights(model).items()}


def test_an_update_that_would_overflow_the_weights_is_undone_and_skipping_gives_up(tmp_path: Path) -> None:
    """Adam moves each weight by about the learning rate: 1e40 is past float32, while the loss that
    produced the update is finite. That step used to go through, and every later one was skipped."""
    cfg = config.parse(config.starter_text())
    cfg.lora.rank = 4
    for key, value in {"iterations": 30, "batch_size": 4, "validation_batches": 1, "steps_per_eval": 1000,
                       "on_nonfinite": "skip"}.items():
        setattr(cfg.training, key, value)
    cfg.optimizer.learning_rate = 1e40
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    before = _weights(trainer.model)
    events: list[Any] = []
    result = run_loop(trainer, events.append)
    after = _weights(trainer.model)
    assert all(np.array_equal(before[name], after[name]) for name in before)  # every update undone
    assert any(isinstance(e, Save) for e in events) and not any(isinstance(e, SaveFailed) for e in events)
    bad = [e for e in events if isinstance(e, NonFinite)]
    limit = trainer.parameters.nonfinite_streak_limit
    assert bad[0].cause == "update" and math.isfinite(bad[0].loss)
    assert [e.action for e in bad] == ["skipped"] * (limit - 1) + ["pause"]
    assert [e.streak for e in bad] == list(range(1, limit + 1))
    assert result.reason == "non_finite" and trainer.iteration == limit  # no library control hook: it ends


def test_a_nan_gradient_under_a_finite_loss_is_caught(tmp_path: Path) -> None:
    """The loss adds 0 x sqrt(|w - w|): its value is the plain loss, its gradient is NaN (an
    injected fault). Before, only the loss was checked, so this update went through."""
    from mlx_lm import load

    from tunetop.training.config import LoRAConfig
    from tunetop.training.embedded import embedded_data_path, embedded_model_path

    model, tokenizer = load(str(embedded_model_path()))  # type: ignore[misc]
    apply_fine_tuning(model, LoRAConfig(rank=4, num_layers=2))
    splits = load_splits(embedded_data_path(), tokenizer)

    def nan_gradient_loss(model: Any, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        value, count = default_loss(model, tokens, lengths)
        _name, weight = tree_flatten(model.trainable_parameters())[0]
        return value + 0.0 * mx.sqrt(mx.abs(weight - mx.stop_gradient(weight))).sum(), count  # type: ignore[operator]

    before = _weights(model)
    events: list[Any] = []
    parameters = TrainingParameters(iterations=5, steps_per_eval=1000, validation_batches=1, on_nonfinite="pause",
                                    adapter_path=tmp_path / "adapters")
    result = train(model, splits["train"], splits["valid"], optim.Adam(learning_rate=1e-3), tokenizer, parameters,
                   loss=nan_gradient_loss, progress=events.append)
    after = _weights(model)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    (bad,) = [e for e in events if isinstance(e, NonFinite)]
    assert bad.cause == "gradients" and math.isfinite(bad.loss) and bad.iteration == 1
    assert result.reason == "non_finite"


def _checkpoint_paths(message: str) -> list[str]:
    return re.findall(r"(/\S+/checkpoints/\d+)", message)


BROKEN_WHILE_FLAGGED = """
from pathlib import Path

from tunetop.training.trainer import default_loss

FLAG = Path(__file__).with_name("broken")


def loss(model, tokens, lengths, segments=None):
    value, counted = default_loss(model, tokens, lengths, segments=segments)
    return (value * float("inf") if FLAG.exists() else value), counted
"""
"""A loss that is not finite while a flag file exists when the engine compiles its step: a learning
rate past float32 (1e40, the way this test used to break a run) is refused by the config now. The
flag is read when the step is traced, so it holds for the life of an engine process."""


def test_a_skipping_run_pauses_instead_of_skipping_forever_and_recovers(tmp_path: Path) -> None:
    (tmp_path / "broken_loss.py").write_text(BROKEN_WHILE_FLAGGED, encoding="utf-8")
    (tmp_path / "broken").touch()
    config_path = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 1, "on_nonfinite": "skip", "loss": "broken_loss.py:loss"},
        checkpoints={"save_every": 100_000},
    )
    run = resolve(tunetop("train", str(config_path), "--detach", check=True).stdout.strip())
    try:
        wait_for(lambda: send_command(run, "status").result["state"] == "paused", timeout=120)
        events = list(read_events(run.journal))
        bad = [e for e in events if e["type"] == "nonfinite"]
        assert len(bad) == 10 and bad[-1]["action"] == "pause" and bad[-1]["cause"] == "loss"
        warnings = [e["message"] for e in events if e["type"] == "warning" and "(epoch" in e["message"]]
        assert len(warnings) == 10 and "10 steps in a row" in warnings[-1] and "learning_rate" in warnings[-1]
        # None was saved yet, and the messages say so (they used to promise "the last good checkpoint").
        assert all(m.endswith("No checkpoint has been saved yet.") for m in warnings)
        # The weights stayed finite: a save works, and its checkpoint holds finite weights.
        saved = send_command(run, "save")
        assert saved.ok, saved.error
        _state, weights, _ = read_checkpoint(Path(saved.result["checkpoint"]))
        assert all(bool(mx.all(mx.isfinite(w)).item()) for w in weights.values())
        # The cause gone (as a sane learning rate would be) and the run continued: finite losses.
        assert send_command(run, "stop").ok
        wait_for(lambda: not run.is_alive(), timeout=120)
        (tmp_path / "broken").unlink()
        tunetop("train", "--resume", run.id, "--detach", check=True)
        wait_for(lambda: any(e["type"] == "train" and e["loss"] is not None and math.isfinite(e["loss"])
                             for e in read_events(run.journal)), timeout=180)
        for message in (e["message"] for e in read_events(run.journal) if e["type"] in ("warning", "error")):
            assert all(Path(path).is_dir() for path in _checkpoint_paths(message)), message
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)
            wait_for(lambda: not run.is_alive(), timeout=10)
