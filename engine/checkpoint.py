"""Full-state checkpoints: everything an exact resume needs, written so no crash can tear one.

A checkpoint is a folder ``checkpoints/0000100/`` holding:

* ``adapters.safetensors``  the trainable weights
* ``optimizer.safetensors`` the optimizer state, flattened (moments, step, learning rate)
* ``state.json``            iteration, trained tokens, data epoch and position, the live
                            learning-rate override, the validation loss at save, the journal
                            seq, and the config values that decide what training computes

It is written into a temporary folder; every file is fsynced (F_FULLFSYNC on macOS), the
folder is renamed into place, the parent folder is fsynced, and only then is the ``latest``
pointer replaced atomically. A crash at any moment leaves the previous checkpoints intact and
at worst a ``.tmp-*`` folder, which the next save removes. The random state needs no saving:
the trainer reseeds ``mx.random`` from (seed, iteration) before every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .atomic import fsync_dir, fsync_file, write_text_atomic

STATE_FILE = "state.json"
WEIGHTS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or written; the message says which and why."""


@dataclass
class TrainerState:
    """The scalar part of a checkpoint."""

    iteration: int
    trained_tokens: int
    epoch: int
    position: int
    learning_rate_override: float | None
    validation_loss: float | None
    seq: int
    config_hash: str
    saved_at: float
    # config.computation_values at the run's start (None in checkpoints of older versions,
    # which only have config_hash, a hash of the whole file's text).
    config: dict[str, Any] | None = None


def config_hash(text: str) -> str:
    """A short hash of the run config's text, stored with each checkpoint."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def checkpoint_name(iteration: int) -> str:
    return f"{iteration:07d}"


def _fault_pause() -> None:
    """Fault-injection tests set TUNETOP_FAULT_SLOW_CHECKPOINT (seconds) to widen the window in
    which a SIGKILL lands mid-write; unset, this does nothing."""
    delay = os.environ.get("TUNETOP_FAULT_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        fsync_file(handle.fileno())


def write_checkpoint(
    directory: Path, state: TrainerState, weights: dict[str, mx.array], optimizer_state: dict[str, Any]
) -> Path:
    """Write one checkpoint atomically and point ``latest`` at it; return its folder."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the whole run (engine.private)
    for stale in directory.glob(".tmp-*"):  # leftovers of a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / checkpoint_name(state.iteration)
    temp = directory / f".tmp-{checkpoint_name(state.iteration)}-{os.getpid()}"
    temp.mkdir(mode=0o700)
    try:
        flat_optimizer = {k: v for k, v in tree_flatten(optimizer_state) if isinstance(v, mx.array)}  # type: ignore[misc,str-unpack]
        mx.eval(weights, flat_optimizer)
        mx.save_safetensors(str(temp / WEIGHTS_FILE), weights)
        mx.save_safetensors(str(temp / OPTIMIZER_FILE), flat_optimizer)
        (temp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):
            _fsync_path(temp / name)
            _fault_pause()
        fsync_dir(temp)
        if final.exists():  # a second save at the same iteration replaces the first
            trash = directory / f".tmp-old-{checkpoint_name(state.iteration)}-{os.getpid()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        temp.rename(final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    write_text_atomic(directory / LATEST, final.name + "\n")
    return final


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(directory: Path) -> Path | None:
    """The folder ``latest`` names, or the newest complete one if the pointer is missing or stale."""
    try:
        name = (directory / LATEST).read_text().strip()
        candidate = directory / name
        if name and is_complete(candidate):
            return candidate
    except FileNotFoundError:
        pass
    found = list_checkpoints(directory)
    return found[-1] if found else None


def find_checkpoint(directory: Path, iteration: int | None) -> Path:
    """The checkpoint of ``iteration`` (None = the latest); CheckpointError lists what exists."""
    if iteration is None:
        found = latest_checkpoint(directory)
    else:
        candidate = directory / checkpoint_name(iteration)
        found = candidate if is_complete(candidate) else None
    if found is None:
        have = ", ".join(p.name.lstrip("0") or "0" for p in list_checkpoints(directory)) or "none"
        wanted = "checkpoint yet" if iteration is None else f"checkpoint at iteration {iteration}"
        raise CheckpointError(f"{directory}: no {wanted}; checkpoints at iterations: {have}.")
    return found


def read_checkpoint(folder: Path) -> tuple[TrainerState, dict[str, mx.array], dict[str, mx.array]]:
    """(state, trainable weights, flat optimizer state) of one checkpoint."""
    try:
        state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
        weights = mx.load(str(folder / WEIGHTS_FILE))
        optimizer_state = mx.load(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot read checkpoint: {error}") from None
    return state, weights, optimizer_state  # type: ignore[return-value]


def prune(directory: Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints and the best by validation loss; delete the rest."""
    found = list_checkpoints(directory)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    keep = set(found[-keep_last:])
    scored = []
    for folder in found:
        try:
            loss = json.loads((folder / STATE_FILE).read_text()).get("validation_loss")
        except (OSError, ValueError):
            loss = None
        if isinstance(loss, (int, float)) and loss == loss:
            scored.append((loss, folder))
    if scored:
        keep.add(min(scored)[1])
    latest = latest_checkpoint(directory)
    if latest is not None:
        keep.add(latest)
    removed = []
    for folder in found:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

