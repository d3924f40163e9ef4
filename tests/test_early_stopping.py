"""Early stopping, for real: an engine training the embedded model on data whose validation loss
stops improving ends with reason ``early_stopped``, names the best iteration, keeps that
checkpoint through ``keep_last``, and ends at the same iteration after a SIGKILL and a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import tunetop, write_config
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir, list_runs
from tunetop.training.checkpoint import best_checkpoint, checkpoint_iteration, list_checkpoints
from tunetop.training.early_stopping import EarlyStopping
from tunetop.training.embedded import embedded_data_path

PATIENCE = 3
EVERY = 4  # steps_per_eval and save_every: every validated iteration has its checkpoint


def diverging_data(folder: Path) -> Path:
    """Training teaches "Where does X live?" -> " X: city=Y."; validation wants another answer to
    the same questions. The first steps teach tokens both share (the validation loss falls from
    the base model's); then training pulls away from what validation wants (it stops falling)."""
    rows = [json.loads(line) for line in (embedded_data_path() / "train.jsonl").read_text().splitlines()]
    single = [row for row in rows if row["prompt"].startswith("Where does")][:64]
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in single))
    valid = [{"prompt": row["prompt"], "completion": " I do not know where they live."} for row in single[:32]]
    (folder / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in valid))
    return folder


def config(tmp_path: Path, **training: object) -> Path:
    return write_config(
        tmp_path / "run.toml",
        data={"path": str(diverging_data(tmp_path / "data")), "mask_prompt": True},
        training={"iterations": 200, "steps_per_report": EVERY, "steps_per_eval": EVERY, "validation_batches": 0,
                  "early_stopping_patience": PATIENCE, **training},
        optimizer={"learning_rate": 2e-3},
        checkpoints={"save_every": EVERY, "keep_last": 1},
    )


def validations(run: RunDir, after_seq: int = 0) -> dict[int, float]:
    return {e["iteration"]: e["loss"] for e in read_events(run.journal) if e["type"] == "validation" and e["seq"] > after_seq}


def finished(run: RunDir) -> dict:
    (event,) = [e for e in read_events(run.journal) if e["type"] == "finished"][-1:]
    return event


def expected_end(losses: dict[int, float]) -> tuple[int, int]:
    """(where the run stops, the best iteration), worked out from the validation losses alone."""
    best_at, best, waited = None, None, 0
    for iteration in sorted(losses):
        if best is None or losses[iteration] < best:
            best_at, best, waited = iteration, losses[iteration], 0
        else:
            waited += 1
            if waited == PATIENCE:
                assert best_at is not None
                return iteration, best_at
    raise AssertionError(f"patience never ran out: {losses}")


def test_the_tracker_counts_validations_without_an_improvement() -> None:
    stopping = EarlyStopping(patience=2, min_delta=0.1)
    assert not stopping.observe(0, 5.0)
    assert not stopping.observe(4, 4.95)  # less than min_delta better: no improvement
    assert stopping.best_iteration == 0 and stopping.waited == 1
    assert (stopping.lowest_loss, stopping.lowest_iteration) == (4.95, 4)  # what the run reports as its best
    assert not stopping.observe(8, 4.0)  # an improvement resets the count
    assert stopping.best_iteration == 8 and stopping.waited == 0
    assert not stopping.observe(12, float("nan"))
    assert stopping.observe(16, 4.0)
    again = EarlyStopping(patience=2, min_delta=0.1)
    again.restore(stopping.state())
    assert (again.best_loss, again.best_iteration, again.waited) == (4.0, 8, 2)
    assert (again.lowest_loss, again.lowest_iteration) == (4.0, 8)
    assert "2 validations in a row" in again.describe() and "4.0000 at iteration 8" in again.describe()
    assert not EarlyStopping(patience=0).observe(0, 1.0) and EarlyStopping(patience=0).exhausted is False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_stops_early_keeps_its_best_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    path = config(tmp_path)
    result = tunetop("train", str(path), check=True)
    (straight,) = list_runs()
    losses = validations(straight)
    stop_at, best_at = expected_end(losses)
    end = finished(straight)
    assert end["reason"] == "early_stopped" and end["iteration"] == stop_at < 200
    assert end["best_iteration"] == best_at > 0 and end["best_loss"] == losses[best_at]
    assert max(losses) == stop_at  # no validation after the stop
    assert f"best validation loss {losses[best_at]:.4f} at iteration {best_at}" in result.stdout
    logs = [e["message"] for e in read_events(straight.journal) if e["type"] == "log"]
    assert any(f"at iteration {best_at}" in m and "early_stopping_patience = 3" in m for m in logs)

    # keep_last = 1 deleted every checkpoint but the last and the best.
    kept = [checkpoint_iteration(p) for p in list_checkpoints(straight.checkpoints)]
    assert kept == sorted({best_at, stop_at}), kept
    assert best_checkpoint(straight.checkpoints) is not None
    assert checkpoint_iteration(best_checkpoint(straight.checkpoints)) == best_at

    # --checkpoint best: test and export take the best checkpoint's adapter.
    scored = tunetop("test", straight.id, "--split", "valid", "--checkpoint", "best", "--json", check=True)
    assert json.loads(scored.stdout)["iteration"] == best_at
    assert abs(json.loads(scored.stdout)["loss"] - losses[best_at]) < 1e-3  # the same split, the same weights (float32 sums)
    exported = tunetop("export", straight.id, "--format", "mlx", "--output", str(tmp_path / "best"), "--checkpoint", "best", check=True)
    assert f"the adapter of iteration {best_at:,} (the best checkpoint)" in exported.stdout
    assert (tmp_path / "best" / "adapters.safetensors").read_bytes() == (
        straight.checkpoints / f"{best_at:07d}" / "adapters.safetensors"
    ).read_bytes()

    # sample --checkpoint best: a finished run (no engine) completes a prompt with the best adapter.
    sampled = tunetop("sample", straight.id, "--prompt", "Where does Ivo live?", "--checkpoint", "best",
                      "--max-tokens", "6", "--json", check=True)
    answer = json.loads(sampled.stdout)
    assert answer["iteration"] == best_at and answer["prompt_format"] != "raw" and answer["completion"]
    said = tunetop("sample", straight.id, "--prompt", "Where does Ivo live?", "--checkpoint", str(stop_at), "--max-tokens", "6", check=True)
    assert said.stdout.startswith(f"sample: from the weights of iteration {stop_at}")

    # Killed after a validation that did not improve (the count is 1), then resumed: the count
    # comes back with the checkpoint, so the run stops where the uninterrupted one did.
    kill_after = (best_at + EVERY) // EVERY  # the K-th checkpoint: the one just after the best
    env = {**os.environ, "TUNETOP_FAULT_KILL_AT": f"checkpoint.latest written#{kill_after}"}
    killed = tunetop("train", str(path), env=env)
    assert killed.returncode != 0
    run = next(r for r in list_runs() if r.id != straight.id)
    assert not [e for e in read_events(run.journal) if e["type"] == "finished"]
    resumed = tunetop("train", "--resume", run.id, check=True)
    assert f"resumed at iteration {best_at + EVERY}" in resumed.stdout
    resume_seq = next(e["seq"] for e in read_events(run.journal) if e["type"] == "resumed")
    again = finished(run)
    assert (again["reason"], again["iteration"], again["best_iteration"]) == ("early_stopped", stop_at, best_at)
    after = validations(run, resume_seq)
    assert after == {i: loss for i, loss in losses.items() if i > best_at + EVERY}  # bit for bit


def test_patience_and_min_delta_are_checked_and_live(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", training={"early_stopping_patience": -1})
    result = tunetop("train", str(bad))
    assert result.returncode == 2 and "early_stopping_patience" in result.stderr and "Traceback" not in result.stderr
    from tunetop.training.config import ConfigError, coerce_live

    assert coerce_live("early_stopping_patience", "5") == 5
    assert coerce_live("early_stopping_min_delta", "0.01") == 0.01
    with pytest.raises(ConfigError, match="early_stopping_min_delta"):
        coerce_live("early_stopping_min_delta", "-1")
