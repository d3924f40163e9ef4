"""Full-state checkpoints: everything an exact resume needs, written so no crash can tear one.

A checkpoint is a folder ``checkpoints/0000100/`` holding:

* ``adapters.safetensors``  the trainable weights
* ``optimizer.safetensors`` the optimizer state, flattened (moments, step, learning rate)
* ``state.json``            iteration, trained tokens, data epoch and position, the live
                            learning-rate override, the validation loss at save, the journal
                            seq, and the config values that decide what training computes

It is written into a temporary folder; every file is fsynced (F_FULLFSYNC on macOS), the
folder is renamed to a name no folder has (``0000100``, or ``0000100.1``, ``0000100.2``... for
a second and third save at the same iteration), the parent folder is fsynced, and only then is
the ``latest`` pointer replaced atomically; an older folder of the same iteration is removed
last. So at every instant ``latest`` names a complete checkpoint: a crash at any moment leaves
the previous checkpoints intact and at worst a ``.tmp-*`` folder, which the next save removes.
(Older versions renamed the first save at an iteration away before renaming a second one
in, and a kill between the two left ``latest`` naming nothing; ``recover`` turns the complete
copies such a crash left in ``.tmp-*`` folders back into checkpoints.) The random
state needs no saving: the trainer reseeds ``mx.random`` from (seed, iteration) before every
step. tests/test_checkpoint_kills.py kills a save at every step (tunetop.faults).

Finding and listing checkpoints imports no mlx (the TUI resumes runs on machines without it):
only writing and reading the arrays does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunetop.atomic import fsync_dir, fsync_file, remove_stale_temps, write_text_atomic
from tunetop.faults import point

if TYPE_CHECKING:
    import mlx.core as mx

STATE_FILE = "state.json"
WEIGHTS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LATEST = "latest"
_NAME = re.compile(r"^(\d{7,})(?:\.(\d+))?$")
"""A checkpoint folder's name: the iteration, then ``.K`` for the K-th later save at that iteration."""


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
    # The iteration validation_loss was measured at: this checkpoint's own weights only when it
    # equals ``iteration`` (None in checkpoints of older versions).
    validation_iteration: int | None = None
    early_stopping: dict[str, Any] | None = None  # early_stopping.EarlyStopping.state(), for an exact resume


def config_hash(text: str) -> str:
    """A short hash of the run config's text, stored with each checkpoint."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def checkpoint_name(iteration: int) -> str:
    """The folder name of the first checkpoint at ``iteration``."""
    return f"{iteration:07d}"


def _order(name: str) -> tuple[int, int] | None:
    """(iteration, K) of a checkpoint folder name, None for anything else."""
    match = _NAME.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2) or 0))


def checkpoint_iteration(folder: Path) -> int:
    """The iteration a checkpoint folder holds: from its name (``0000005``, ``0000005.1``), or
    for a copy a crash left in a ``.tmp-*`` folder (see ``recover``), from its state."""
    order = _order(folder.name)
    if order is not None:
        return order[0]
    try:
        return int(json.loads((folder / STATE_FILE).read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: not a checkpoint ({error})") from None


def _fault_pause() -> None:
    """Fault-injection tests set TUNETOP_FAULT_SLOW_CHECKPOINT (seconds) to widen the window in
    which a SIGKILL lands mid-write; unset, this does nothing."""
    delay = os.environ.get("TUNETOP_FAULT_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        fsync_file(handle.fileno())


def _unused_name(directory: Path, iteration: int) -> Path:
    """A folder name for a new checkpoint at ``iteration`` that no folder has had this save."""
    taken = [order[1] for p in directory.iterdir() if (order := _order(p.name)) and order[0] == iteration]
    name = checkpoint_name(iteration)
    return directory / (f"{name}.{max(taken) + 1}" if taken else name)


def write_checkpoint(
    directory: Path, state: TrainerState, weights: dict[str, mx.array], optimizer_state: dict[str, Any]
) -> Path:
    """Write one checkpoint atomically and point ``latest`` at it; return its folder.

    The caller holds the run's lock (one writer). Each step ends at a fault point, so the tests
    can kill a save between any two of them.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the whole run (tunetop.private)
    recover(directory)  # a crash of an older version may have left the only copies in .tmp-*
    _remove_leftovers(directory)
    point("checkpoint.cleaned")
    temp = directory / f".tmp-{checkpoint_name(state.iteration)}-{os.getpid()}"
    import mlx.core as mx
    from mlx.utils import tree_flatten

    temp.mkdir(mode=0o700)
    try:
        flat_optimizer = {k: v for k, v in tree_flatten(optimizer_state) if isinstance(v, mx.array)}  # type: ignore[misc,str-unpack]
        mx.eval(weights, flat_optimizer)
        mx.save_safetensors(str(temp / WEIGHTS_FILE), weights)
        point("checkpoint.weights written")
        mx.save_safetensors(str(temp / OPTIMIZER_FILE), flat_optimizer)
        point("checkpoint.optimizer written")
        (temp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        point("checkpoint.state written")
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):
            _fsync_path(temp / name)
            _fault_pause()
        fsync_dir(temp)
        point("checkpoint.synced")
        # A new name even for a second save at the same iteration: the folder `latest` names
        # stays where it is until `latest` names the new one.
        final = _unused_name(directory, state.iteration)
        temp.rename(final)
        fsync_dir(directory)
        point("checkpoint.renamed")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    write_text_atomic(directory / LATEST, final.name + "\n")
    point("checkpoint.latest written")
    for older in directory.iterdir():  # an earlier save at this iteration, superseded
        order = _order(older.name)
        if order and order[0] == state.iteration and older != final:
            _retire(older)
    return final


def _retire(folder: Path) -> bool:
    """Remove a checkpoint folder: renamed out of the listing first, so a crash mid-removal
    leaves a ``.tmp-*`` folder (removed by the next save), never a half-deleted checkpoint.
    False when it could not be moved (a read-only folder): it stays, and nothing is lost."""
    trash = folder.with_name(f".tmp-old-{folder.name}-{os.getpid()}")
    try:
        folder.rename(trash)
    except OSError:
        return False
    point("checkpoint.old renamed")
    shutil.rmtree(trash, ignore_errors=True)
    point("checkpoint.old removed")
    return True


def _remove_leftovers(directory: Path) -> None:
    """The ``.tmp-*`` folders and pointer temp files of saves that died (the caller holds the lock)."""
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    remove_stale_temps(directory)


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (by iteration, then by save at that iteration)."""
    if not directory.is_dir():
        return []
    found = [(order, p) for p in directory.iterdir() if (order := _order(p.name)) and p.is_dir() and is_complete(p)]
    return [p for _order_, p in sorted(found)]


def _latest_named(directory: Path) -> Path | None:
    """The folder the ``latest`` pointer names, if it is a complete checkpoint."""
    try:
        name = (directory / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    candidate = directory / name
    return candidate if _order(name) and is_complete(candidate) else None


def latest_checkpoint(directory: Path) -> Path | None:
    """The folder ``latest`` names; else the newest complete one; else a complete copy left in a
    ``.tmp-*`` folder by a crash (see ``recover``). None when there is no checkpoint at all."""
    named = _latest_named(directory)
    if named is not None:
        return named
    found = list_checkpoints(directory)
    if found:
        return found[-1]
    left = _recoverable(directory)
    return left[-1][1] if left else None


def _safetensors_whole(path: Path) -> bool:
    """True when a safetensors file holds all the bytes its header promises (no torn write)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return os.fstat(handle.fileno()).st_size == 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def _recoverable(directory: Path) -> list[tuple[tuple[int, float], Path]]:
    """Complete, whole checkpoints sitting in ``.tmp-*`` folders, oldest first."""
    found = []
    for folder in directory.glob(".tmp-*"):
        if not (folder.is_dir() and is_complete(folder)):
            continue
        try:
            state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _safetensors_whole(folder / WEIGHTS_FILE) and _safetensors_whole(folder / OPTIMIZER_FILE):
            found.append(((state.iteration, state.saved_at), folder))
    return sorted(found)


def recover(directory: Path) -> list[Path]:
    """Make ``latest`` name a complete checkpoint again after a crash; return promoted folders.

    Only for the process that holds the run's lock (the engine, at resume and before each
    save). When ``latest`` names nothing complete but a complete folder exists, ``latest`` is
    pointed at the newest. When no complete folder exists at all, complete and whole copies in
    ``.tmp-*`` folders (a crash of an older version mid-save) are renamed into place first.
    Nothing is promoted while a complete checkpoint exists: a ``.tmp-*`` folder then is an
    unfinished save, never newer truth.
    """
    if not directory.is_dir() or _latest_named(directory) is not None:
        return []
    promoted = []
    if not list_checkpoints(directory):
        for (iteration, _saved_at), folder in _recoverable(directory):
            for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):  # a kill may have come before the fsync
                _fsync_path(folder / name)
            fsync_dir(folder)
            final = _unused_name(directory, iteration)
            folder.rename(final)
            promoted.append(final)
        if promoted:
            fsync_dir(directory)
    found = list_checkpoints(directory)
    if found:
        write_text_atomic(directory / LATEST, found[-1].name + "\n")
    return promoted


def find_checkpoint(directory: Path, iteration: int | None) -> Path:
    """The checkpoint of ``iteration`` (None = the latest); CheckpointError lists what exists.

    Of several saves at one iteration, the newest."""
    if iteration is None:
        found = latest_checkpoint(directory)
    else:
        candidates = [p for p in list_checkpoints(directory) if checkpoint_iteration(p) == iteration]
        if not candidates and directory.is_dir():  # a copy a crash left in a .tmp-* folder
            candidates = [p for (at, _saved), p in _recoverable(directory) if at == iteration]
        found = candidates[-1] if candidates else None
    if found is None:
        iterations = sorted({checkpoint_iteration(p) for p in list_checkpoints(directory)})
        have = ", ".join(str(i) for i in iterations) or "none"
        wanted = "checkpoint yet" if iteration is None else f"checkpoint at iteration {iteration}"
        raise CheckpointError(f"{directory}: no {wanted}; checkpoints at iterations: {have}.")
    return found


def read_checkpoint(folder: Path) -> tuple[TrainerState, dict[str, mx.array], dict[str, mx.array]]:
    """(state, trainable weights, flat optimizer state) of one checkpoint."""
    import mlx.core as mx

    try:
        state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
        weights = mx.load(str(folder / WEIGHTS_FILE))
        optimizer_state = mx.load(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot read checkpoint: {error}") from None
    return state, weights, optimizer_state  # type: ignore[return-value]


def _saved_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def best_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss measured on its own weights.

    A checkpoint records the last validation loss before it; only one saved at the iteration of
    that validation holds the weights the loss was measured on (a save between validations
    carries an older loss, and once kept the first such checkpoint forever). Of equal losses the
    earliest, the iteration early stopping names. A checkpoint of an older version (no
    ``validation_iteration``) counts with its loss as before, equal losses going to the newest.
    None when no checkpoint qualifies.
    """
    best: tuple[float, Path] | None = None
    for folder in list_checkpoints(directory):  # oldest first
        state = _saved_state(folder)
        loss = state.get("validation_loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or loss != loss or loss in (float("inf"), float("-inf")):
            continue
        legacy = "validation_iteration" not in state
        if not legacy and state["validation_iteration"] != checkpoint_iteration(folder):
            continue
        if best is None or loss < best[0] or (legacy and loss == best[0]):
            best = (loss, folder)
    return None if best is None else best[1]


def prune(directory: Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoints and the best by validation loss
    (:func:`best_checkpoint`); delete the rest."""
    found = list_checkpoints(directory)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    keep = set(found[-keep_last:])
    best = best_checkpoint(directory)
    if best is not None:
        keep.add(best)
    latest = latest_checkpoint(directory)
    if latest is not None:
        keep.add(latest)
    removed = []
    for folder in found:
        if folder not in keep and _retire(folder):
            removed.append(folder)
    return removed
