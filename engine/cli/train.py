"""Starting runs: `tunetop train`, `demo`, `init`, and the internal `_engine` and `_follower` of the engine's processes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tunetop.blas import preload_optimized_blas
from tunetop.cli.common import _fail
from tunetop.control.endpoints import socket_dir
from tunetop.private import ENGINE_UMASK, raise_open_file_limit
from tunetop.runs.folders import RunError
from tunetop.runs.launch import mark_failed_start
from tunetop.training.config import ConfigError


def _world_args(args: argparse.Namespace) -> list[str]:
    """The ``_engine`` flags that carry --np, --hosts and --backend."""
    if args.hosts:
        return ["--hosts", args.hosts, "--backend", args.backend]
    return ["--np", str(args.np), "--backend", args.backend] if args.np > 1 else []


def _ranks(args: argparse.Namespace) -> int:
    from tunetop.runs.distributed import WorldError, parse_hosts

    try:
        return len(parse_hosts(args.hosts)) if args.hosts else max(1, args.np)
    except WorldError as error:
        raise ConfigError(str(error)) from None


def _start_run(cfg: Any, detach: bool, listen: str = "", world: list[str] | None = None) -> tuple[int, str]:
    """Start a run for ``cfg`` (tunetop.runs.launch); (exit code, run id). Start failures are printed."""
    from tunetop.runs.daemon import EngineStartError
    from tunetop.runs.launch import start_run

    if listen:  # refuse an unsafe listener before anything is created
        from tunetop.control.security import check_listen, exposure_warning

        socket_dir()  # a socket folder that is not private is refused first, as without --listen
        check_listen(listen)
        if warning := exposure_warning(listen):
            print(f"tunetop: warning: {warning}", file=sys.stderr)
    extra = (["--listen", listen] if listen else []) + (world or [])
    try:
        run, code = start_run(cfg, detach, extra, foreground=_engine_main)
    except EngineStartError as error:
        print(f"tunetop: {error}", file=sys.stderr)
        return error.code, error.run_id
    return code, run.id


def _engine_main(run_path: Path, extra: list[str]) -> int:
    """Run the engine in this process with ``_engine``'s flags (the foreground path)."""
    from tunetop.cli import build_parser  # the parser imports this module

    args = build_parser().parse_args(["_engine", str(run_path), *extra])
    return _run_engine(
        run_path, foreground=True, resume=args.resume, resume_from=args.start_from, listen=args.listen, plan=_plan(args),
        config_source=args.config_source,
    )


def _plan(args: argparse.Namespace) -> Any:
    from tunetop.runs.distributed import Plan

    return Plan(size=max(1, args.np), backend=args.backend, hosts=args.hosts, launched=args.launched)


def _launch_mpi(args: argparse.Namespace, cfg: Any) -> int:
    """``--hosts ... --backend mpi``: every rank started by mlx.launch (mpirun); rank 0 is here."""
    import subprocess

    from tunetop.runs.distributed import WorldError, mpi_launch_command, parse_hosts
    from tunetop.runs.launch import new_run

    try:
        hosts = parse_hosts(args.hosts)
    except WorldError as error:
        return _fail(str(error))
    run = new_run(cfg)
    command = mpi_launch_command(run.path, hosts, [])
    print(f"run {run.id}: {' '.join(command)}", flush=True)
    if not args.detach:
        return subprocess.call(command)
    from tunetop.runs.daemon import EngineStartError, spawn_command

    try:
        spawn_command(run, command)
    except EngineStartError as error:
        print(f"tunetop: {error}", file=sys.stderr)
        return error.code
    print(run.id)
    return 0


def _run_engine(
    run_path: Path,
    foreground: bool,
    resume: bool = False,
    resume_from: int | None = None,
    listen: str = "",
    plan: Any = None,
    config_source: str = "",
) -> int:
    """Run the engine for an existing run folder in this process; ``config_source`` is the file
    a new run's config was copied from (its errors name that file)."""
    from tunetop.runs.console import ConsoleReporter
    from tunetop.runs.engine import Engine
    from tunetop.runs.folders import RunDir
    from tunetop.training import config as config_module

    os.umask(ENGINE_UMASK)  # what libraries write (checkpoints' safetensors) is private too
    raise_open_file_limit()  # each client connection holds a descriptor; libzmq aborts at EMFILE
    preload_optimized_blas(warn=True)
    run = RunDir(run_path)
    cfg = config_module.load(run.config)
    if config_source and not resume:
        cfg.source = config_source
    reporter = ConsoleReporter(cfg.training.iterations) if foreground else ConsoleReporter(cfg.training.iterations, sys.stdout)
    engine = Engine(cfg, run, echo=reporter, resume=resume, resume_from=resume_from, plan=plan)
    from tunetop.control.server import attach_server

    tcp = None
    if listen:
        from tunetop.control.security import CurveError, exposure_warning, prepare

        try:
            tcp = prepare(listen, run.path)
            warning = exposure_warning(listen)
        except CurveError as error:
            mark_failed_start(run, str(error), cfg.name)
            return _fail(str(error))
        if warning:
            engine.on_ready.append(lambda owner: owner.emit("warning", message=warning))
    engine.on_ready.append(lambda owner: attach_server(owner, tcp))
    if foreground:
        print(f"run {run.id} in {run.path}", flush=True)
    try:
        return engine.run()
    except (RunError, ConfigError) as error:  # before the journal opened: no event can say it
        mark_failed_start(run, str(error), cfg.name)
        raise
    finally:
        reporter.close()


def cmd_train(args: argparse.Namespace) -> int:
    from tunetop.runs.launch import load_run_config
    from tunetop.training.config import check_ranks

    if args.resume is not None:
        return _resume(args)
    if not args.config:
        return _fail("train needs a CONFIG file (or --resume RUN to continue a run).")
    if args.start_from is not None:
        return _fail("--from goes with --resume RUN.")
    if args.np > 1 and args.hosts:
        return _fail("give --np (ranks on this machine) or --hosts (one rank per host), not both.")
    cfg = load_run_config(args.config)  # ConfigError: main() prints it
    check_ranks(cfg, _ranks(args))
    if args.hosts and args.backend == "mpi":
        return _launch_mpi(args, cfg)
    try:
        code, run_id = _start_run(cfg, args.detach, args.listen, _world_args(args))
    except ValueError as error:  # CurveError: a malformed --listen
        return _fail(str(error))
    if args.detach and code == 0:
        print(run_id)
    return code


def _resume(args: argparse.Namespace) -> int:
    """``tunetop train --resume RUN [--from ITERATION]``: continue a run in place (tunetop.runs.launch)."""
    from tunetop.runs.daemon import EngineStartError
    from tunetop.runs.folders import resolve
    from tunetop.runs.launch import resume_run
    from tunetop.training.checkpoint import CheckpointError

    run = resolve(args.resume or None)
    try:
        code = resume_run(run, args.start_from, args.detach, _world_args(args), foreground=_engine_main)
    except CheckpointError as error:
        return _fail(str(error))
    except EngineStartError as error:
        print(f"tunetop: {error}", file=sys.stderr)
        return error.code
    if args.detach:
        print(run.id)
    return code


def cmd_engine(args: argparse.Namespace) -> int:
    """Internal: the detached engine's entry point (``tunetop _engine RUN_DIR``)."""
    if args.launched:
        from tunetop.runs.distributed import follow, rank_from_env

        if rank_from_env() != 0:  # mlx.launch starts the same command on every host
            os.umask(ENGINE_UMASK)
            preload_optimized_blas(warn=False)
            return follow(args.backend)
    return _run_engine(
        Path(args.run_dir),
        foreground=False,
        resume=args.resume,
        resume_from=args.start_from,
        listen=args.listen,
        plan=_plan(args),
        config_source=args.config_source,
    )


def cmd_follower(args: argparse.Namespace) -> int:
    """Internal: ranks 1..N-1 of a distributed run (started by rank 0 or by mlx.launch)."""
    from tunetop.runs.distributed import follow

    os.umask(ENGINE_UMASK)
    preload_optimized_blas(warn=False)
    return follow(args.backend)


def cmd_init(args: argparse.Namespace) -> int:
    from tunetop.training.config import starter_text

    path = Path(args.path)
    if path.exists() and not args.force:
        return _fail(f"{path} already exists; pass --force to overwrite it.")
    path.write_text(starter_text(), encoding="utf-8")
    print(f"wrote {path}; train it with `tunetop train {path}`")
    return 0


def demo_config() -> Any:
    """The embedded default run: small model, learnable data, loss visibly falling within a minute."""
    from tunetop.training.config import parse, starter_text

    cfg = parse(starter_text())
    cfg.name = "demo"
    cfg.training.iterations = 1000
    cfg.training.steps_per_report = 5
    # Answers every fact of the demo data by iteration ~300 and keeps them; at the starter's 5e-4
    # from ~500, with a noisier validation loss (bench/demo_facts.py).
    cfg.optimizer.learning_rate = 2e-4
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from tunetop.training.embedded import build_embedded

    build_embedded(report=lambda line: print(line, flush=True))  # each stage, the first time only
    cfg = demo_config()
    if args.iterations:
        cfg.training.iterations = args.iterations
    headless = args.headless or not sys.stdout.isatty()
    if headless:
        code, _ = _start_run(cfg, detach=False)
        return code
    code, run_id = _start_run(cfg, detach=True)
    from tunetop.cli.watch import _attach
    from tunetop.runs.folders import resolve

    return _attach(resolve(run_id).id, theme=None)
