"""The best checkpoint by validation loss: kept by retention, found by ``--checkpoint best``."""

from __future__ import annotations

import json
from pathlib import Path

from tunetop.training.checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    best_checkpoint,
    checkpoint_name,
    list_checkpoints,
    prune,
)


def fake_checkpoint(directory: Path, iteration: int, loss: float | None, validated_at: int | None, legacy: bool = False) -> Path:
    """A checkpoint folder as retention sees it (its state; the arrays are never read here)."""
    folder = directory / checkpoint_name(iteration)
    folder.mkdir(parents=True)
    (folder / WEIGHTS_FILE).write_bytes(b"")
    (folder / OPTIMIZER_FILE).write_bytes(b"")
    state = {"iteration": iteration, "validation_loss": loss}
    if not legacy:
        state["validation_iteration"] = validated_at
    (folder / STATE_FILE).write_text(json.dumps(state))
    (directory / "latest").write_text(folder.name + "\n")
    return folder


def kept(directory: Path) -> list[int]:
    return [int(p.name) for p in list_checkpoints(directory)]


def test_a_loss_measured_before_a_checkpoint_keeps_no_old_checkpoint_forever(tmp_path: Path) -> None:
    # Validation only at the start (steps_per_eval past the saves): every checkpoint carries the
    # base model's loss. Retention kept the first of them for good (the tie went to the oldest);
    # the loss was measured on none of them, so none is "the best".
    for iteration in range(10, 70, 10):
        fake_checkpoint(tmp_path, iteration, 2.5, validated_at=0)
        prune(tmp_path, keep_last=2)
    assert kept(tmp_path) == [50, 60]
    assert best_checkpoint(tmp_path) is None


def test_the_best_validated_checkpoint_survives_keep_last(tmp_path: Path) -> None:
    losses = {10: 2.0, 20: 1.5, 30: 1.7, 40: 1.8, 50: 1.9, 60: 1.95}
    for iteration, loss in losses.items():
        fake_checkpoint(tmp_path, iteration, loss, validated_at=iteration)
        fake_checkpoint(tmp_path, iteration + 5, loss, validated_at=iteration)  # saved between validations
        prune(tmp_path, keep_last=2)
    assert kept(tmp_path) == [20, 60, 65]
    assert best_checkpoint(tmp_path) == tmp_path / checkpoint_name(20)


def test_equal_losses_keep_the_first_as_early_stopping_names_it(tmp_path: Path) -> None:
    for iteration in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, iteration, 1.0, validated_at=iteration)
    assert best_checkpoint(tmp_path) == tmp_path / checkpoint_name(10)


def test_checkpoints_of_older_versions_still_count_and_ties_go_to_the_newest(tmp_path: Path) -> None:
    for iteration, loss in ((10, 2.0), (20, 1.0), (30, 1.0), (40, 1.2), (50, 1.3)):
        fake_checkpoint(tmp_path, iteration, loss, validated_at=None, legacy=True)
    prune(tmp_path, keep_last=1)
    assert kept(tmp_path) == [30, 50]


def test_checkpoint_best_without_one_says_why(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import pytest

    from tests.conftest import tunetop
    from tunetop.interop.export import ExportError, chosen_checkpoint

    fake_checkpoint(tmp_path, 10, 2.5, validated_at=0)
    run = SimpleNamespace(id="r1", checkpoints=tmp_path)
    with pytest.raises(ExportError, match="save_every divide training.steps_per_eval"):
        chosen_checkpoint(run, "best")  # type: ignore[arg-type]
    assert chosen_checkpoint(run, 10) == 10  # type: ignore[arg-type]
    wrong = tunetop("export", "--format", "mlx", "--output", str(tmp_path / "out"), "--checkpoint", "soon")
    assert wrong.returncode == 2 and "neither an iteration nor 'best'" in wrong.stderr
