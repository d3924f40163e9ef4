"""Starting and resuming a run: the one path ``tunetop train`` and the TUI's screens both take.

A new run is a config checked here (:func:`load_run_config`, config.check_ranks), a private
run folder holding it, and an engine, in this process (foreground) or detached
(tunetop.runs.daemon). A resume checks that the run is not training and that the checkpoint exists
before anything starts. Errors are the usual ones, each a sentence: ConfigError,
CheckpointError, RunError, and EngineStartError (its ``code`` is the engine's exit code).
No mlx import here: the TUI starts runs on machines where only the engine has MLX.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from tunetop.control.endpoints import socket_dir
from tunetop.faults import point
from tunetop.private import write_private
from tunetop.runs.folders import RunDir, RunError, create_run
from tunetop.training import config as config_module
from tunetop.training.config import RunConfig

ForegroundEngine = Callable[[Path, list[str]], int]
"""Runs the engine for a run folder in this process with ``_engine``'s flags (cli.train._engine_main)."""


def load_run_config(path: str | Path) -> RunConfig:
    """A config file, validated, with its paths checked; a run without a name takes the file's stem."""
    cfg = config_module.load(path)
    config_module.check_paths(cfg)
    if not cfg.name:
        cfg.name = Path(path).stem
    return cfg


def new_run(cfg: RunConfig, run_id: str = "") -> RunDir:
    """A fresh run folder holding ``cfg`` as config.toml (0600, as all of the run).

    The socket folder is checked first, so a folder that is not private is refused before
    anything is created; a config that cannot be written (a full disk) leaves no half-made run.
    ``run_id``: an id reserved before (tunetop.runs.queue), whose folder may exist already.
    """
    socket_dir()
    run = create_run(run_id)
    point("launch: run folder made")
    try:
        write_private(run.config, config_module.dumps(cfg).encode("utf-8"))
    except OSError:
        with contextlib.suppress(OSError):  # a reserved run's folder may hold more: it stays
            run.path.rmdir()  # no half-made run for `tunetop ls` to show
        raise
    return run


def mark_failed_start(run: RunDir, message: str, name: str = "") -> None:
    """Record in status.json that a run's engine failed before it wrote any status of its own, so
    `tunetop ls` shows it as failed (never trained) rather than in an unknown state."""
    status = run.status()
    if not status.get("state"):  # a run that has a state (one being resumed, a live one) keeps it
        run.write_status({"name": name, **status, "state": "failed", "reason": "bad_input", "error": message})


def start_run(
    cfg: RunConfig,
    detach: bool,
    engine_args: list[str] | None = None,
    foreground: ForegroundEngine | None = None,
    run_id: str = "",
    keep_fds: tuple[int, ...] = (),
) -> tuple[RunDir, int]:
    """Create a run for ``cfg`` and start its engine: (the run, an exit code).

    Detached: the code is 0 once the engine trains (EngineStartError if it fails to start).
    In the foreground (``foreground`` given): the engine's own exit code, after the run.
    ``run_id`` and ``keep_fds``: the queue's reserved id and spawn lock (tunetop.runs.scheduler).
    """
    from tunetop.runs.daemon import EngineStartError

    run = new_run(cfg, run_id)
    # The engine's own checks then name the file the user gave (and its line), not the run's copy.
    origin = ["--config-source", str(Path(cfg.source).resolve())] if cfg.source else []
    try:
        return run, _start_engine(run, origin + (engine_args or []), detach, foreground, keep_fds)
    except EngineStartError as error:
        if error.code >= 0:  # killed by a signal (negative) is no failure of the run's own
            mark_failed_start(run, str(error), cfg.name)
        raise


def resume_run(
    run: RunDir,
    iteration: int | None,
    detach: bool,
    engine_args: list[str] | None = None,
    foreground: ForegroundEngine | None = None,
    keep_fds: tuple[int, ...] = (),
) -> int:
    """Continue ``run`` in place from the checkpoint of ``iteration`` (None: the latest).

    Nothing starts unless the run is not training and the checkpoint exists.
    """
    from tunetop.training.checkpoint import find_checkpoint

    socket_dir()
    if run.is_alive():
        raise RunError(f"run {run.id} is still training (pid {run.engine_pid()}); nothing to resume.")
    find_checkpoint(run.checkpoints, iteration)  # a clear error before anything starts
    extra = ["--resume"] + ([] if iteration is None else ["--from", str(iteration)]) + (engine_args or [])
    return _start_engine(run, extra, detach, foreground, keep_fds)


def _start_engine(
    run: RunDir, extra: list[str], detach: bool, foreground: ForegroundEngine | None, keep_fds: tuple[int, ...] = ()
) -> int:
    if detach or foreground is None:
        from tunetop.runs.daemon import spawn_engine

        spawn_engine(run, extra_args=extra, keep_fds=keep_fds)
        return 0
    return foreground(run.path, extra)
