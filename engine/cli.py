"""The ``tunetop`` command line.

Exit codes (also in README.md): 0 success; 1 internal failure (a bug: the engine log has the
traceback); 2 bad input (config, data, model, arguments, unknown run); 3 the engine cannot be
reached or refused a command; 4 ``events`` met damaged journal records (every intact one was
printed, stderr names what was skipped); 130 interrupted by Ctrl-C (adapter saved first); 143
terminated by SIGTERM (adapter saved first).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .blas import preload_optimized_blas
from .config import LIVE_FIELDS, ConfigError
from .endpoints import SocketError, socket_dir
from .launch import mark_failed_start
from .private import ENGINE_UMASK, raise_open_file_limit
from .runs import RunError

EXIT_UNREACHABLE = 3
EXIT_DAMAGED = 4

CONTROL_HELP = {
    "pause": "pause a live run between two steps (`resume` continues it)",
    "resume": "continue a paused run",
    "stop": "save a live run's adapter, then end the run",
    "save": "write a live run's adapter and checkpoint now",
    "evaluate": "run a validation pass on a live run now and print its loss",
    "status": "print a live run's state and iteration",
}
"""The commands that steer a live engine, each with its help line."""

RUN_HELP = "run id, a unique prefix of one, or a run name (default: the latest run)"


def _fail(message: str, code: int = 2) -> int:
    print(f"tunetop: {message}", file=sys.stderr)
    return code


def _world_args(args: argparse.Namespace) -> list[str]:
    """The ``_engine`` flags that carry --np, --hosts and --backend."""
    if args.hosts:
        return ["--hosts", args.hosts, "--backend", args.backend]
    return ["--np", str(args.np), "--backend", args.backend] if args.np > 1 else []


def _ranks(args: argparse.Namespace) -> int:
    from .distributed import WorldError, parse_hosts

    try:
        return len(parse_hosts(args.hosts)) if args.hosts else max(1, args.np)
    except WorldError as error:
        raise ConfigError(str(error)) from None


def _start_run(cfg: Any, detach: bool, listen: str = "", world: list[str] | None = None) -> tuple[int, str]:
    """Start a run for ``cfg`` (engine.launch); (exit code, run id). Start failures are printed."""
    from .daemon import EngineStartError
    from .launch import start_run

    if listen:  # refuse an unsafe listener before anything is created
        from .curve import check_listen, exposure_warning

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
    args = build_parser().parse_args(["_engine", str(run_path), *extra])
    return _run_engine(
        run_path, foreground=True, resume=args.resume, resume_from=args.start_from, listen=args.listen, plan=_plan(args)
    )


def _plan(args: argparse.Namespace) -> Any:
    from .distributed import Plan

    return Plan(size=max(1, args.np), backend=args.backend, hosts=args.hosts, launched=args.launched)


def _launch_mpi(args: argparse.Namespace, cfg: Any) -> int:
    """``--hosts ... --backend mpi``: every rank started by mlx.launch (mpirun); rank 0 is here."""
    import subprocess

    from .distributed import WorldError, mpi_launch_command, parse_hosts
    from .launch import new_run

    try:
        hosts = parse_hosts(args.hosts)
    except WorldError as error:
        return _fail(str(error))
    run = new_run(cfg)
    command = mpi_launch_command(run.path, hosts, [])
    print(f"run {run.id}: {' '.join(command)}", flush=True)
    if not args.detach:
        return subprocess.call(command)
    from .daemon import EngineStartError, spawn_command

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
) -> int:
    """Run the engine for an existing run folder in this process."""
    from . import config as config_module
    from .console import ConsoleReporter
    from .runs import RunDir
    from .session import Engine

    os.umask(ENGINE_UMASK)  # what libraries write (checkpoints' safetensors) is private too
    raise_open_file_limit()  # each client connection holds a descriptor; libzmq aborts at EMFILE
    preload_optimized_blas(warn=True)
    run = RunDir(run_path)
    cfg = config_module.load(run.config)
    reporter = ConsoleReporter(cfg.training.iterations) if foreground else ConsoleReporter(cfg.training.iterations, sys.stdout)
    engine = Engine(cfg, run, echo=reporter, resume=resume, resume_from=resume_from, plan=plan)
    from .server import attach_server

    tcp = None
    if listen:
        from .curve import CurveError, exposure_warning, prepare

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
    from .launch import check_ranks, load_run_config

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
    """``tunetop train --resume RUN [--from ITERATION]``: continue a run in place (engine.launch)."""
    from .checkpoint import CheckpointError
    from .daemon import EngineStartError
    from .launch import resume_run
    from .runs import resolve

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
        from .distributed import follow, rank_from_env

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
    )


def cmd_follower(args: argparse.Namespace) -> int:
    """Internal: ranks 1..N-1 of a distributed run (started by rank 0 or by mlx.launch)."""
    from .distributed import follow

    os.umask(ENGINE_UMASK)
    preload_optimized_blas(warn=False)
    return follow(args.backend)


def cmd_keys(_args: argparse.Namespace) -> int:
    """Make (once) and print this user's client key for TCP listeners."""
    from .curve import clients_dir, make_client_keys

    public = make_client_keys()
    print(f"client public key: {public}")
    print(f"authorize it on the engine's machine: copy it into {clients_dir()}/ (any name ending in .key)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .config import starter_text

    path = Path(args.path)
    if path.exists() and not args.force:
        return _fail(f"{path} already exists; pass --force to overwrite it.")
    path.write_text(starter_text(), encoding="utf-8")
    print(f"wrote {path}; train it with `tunetop train {path}`")
    return 0


def demo_config() -> Any:
    """The embedded default run: small model, learnable data, loss visibly falling within a minute."""
    from .config import parse, starter_text

    cfg = parse(starter_text())
    cfg.name = "demo"
    cfg.training.iterations = 1000
    cfg.training.steps_per_report = 5
    # Answers every fact of the demo data by iteration ~300 and keeps them; at the starter's 5e-4
    # from ~500, with a noisier validation loss (bench/demo_facts.py).
    cfg.optimizer.learning_rate = 2e-4
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_embedded

    build_embedded(report=lambda line: print(line, flush=True))  # each stage, the first time only
    cfg = demo_config()
    if args.iterations:
        cfg.training.iterations = args.iterations
    headless = args.headless or not sys.stdout.isatty()
    if headless:
        code, _ = _start_run(cfg, detach=False)
        return code
    code, run_id = _start_run(cfg, detach=True)
    from .runs import resolve

    return _attach(resolve(run_id).id, theme=None)


def _attach(spec: str | None, theme: str | None, runs_list: bool = False) -> int:
    try:
        from tui.app import run_app, run_remote_app

        from .ssh import is_remote
    except ImportError as error:
        return _fail(f"the TUI cannot start: {error}")
    if is_remote(spec):
        return run_remote_app(str(spec), theme=theme)
    return run_app(spec, theme=theme, runs_list=runs_list)


def cmd_remote_info(args: argparse.Namespace) -> int:
    """Internal, run over ssh by a remote client: where a run's sockets are, as JSON."""
    from .client_sync import run_endpoints
    from .protocol import PROTOCOL_VERSION
    from .runs import resolve

    run = resolve(args.run or None)
    endpoints = run_endpoints(run)
    status = run.status()
    events_path, commands_path = endpoints.paths
    print(
        json.dumps(
            {
                "protocol": PROTOCOL_VERSION,
                "run": run.id,
                "name": status.get("name", ""),
                "state": status.get("state", ""),
                "alive": run.is_alive(),
                "events": str(events_path),
                "commands": str(commands_path),
            }
        )
    )
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    return _attach(args.run, args.theme)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cmd_ls(args: argparse.Namespace) -> int:
    from .runs import list_runs

    if args.host:
        from .ssh import RemoteError, parse_target, run_remote

        try:
            flags = [*(["--json"] if args.json else []), *(["--all"] if args.all else [])]
            print(run_remote(parse_target(args.host, with_run=False), ["ls", *flags]), end="")
        except RemoteError as error:
            return _fail(str(error), EXIT_UNREACHABLE)
        return 0

    rows = []
    trained = []
    hidden = 0
    for run in list_runs():
        s = run.summary()
        if s["failed_before_training"] and not args.all:  # a config or data mistake: nothing to see
            hidden += 1
            continue
        rows.append(
            (s["run"], s["name"], s["state"], s["iter"], s["loss"], "yes" if s["alive"] else "no", _age(s["age_seconds"]))
        )
        trained.append(s["trained"])
    header = ("RUN", "NAME", "STATE", "ITER", "LOSS", "ALIVE", "AGE")
    if args.json:
        for row, was_trained in zip(rows, trained, strict=True):
            print(json.dumps({**dict(zip([h.lower() for h in header], row, strict=True)), "trained": was_trained}))
        return 0
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for number, row in enumerate((header, *rows)):
        line = "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        if number == 0 and hidden:
            line += f"   ({hidden} run{'s' if hidden > 1 else ''} that failed before training hidden; `tunetop ls --all` shows them)"
        print(line)
    return 0


def _warn_damage(path: Path, damage: list[Any]) -> None:
    for stretch in damage:
        print(f"tunetop: warning: {path}: skipped {stretch.describe()}; every intact record is printed.", file=sys.stderr)


def cmd_events(args: argparse.Namespace) -> int:
    """Print the journal; damaged records are skipped and named on stderr, and the exit code is
    then EXIT_DAMAGED (after every intact record), so a script cannot take a damaged history for
    a whole one."""
    from .journal import Damage, JournalTail
    from .runs import resolve

    try:
        run = resolve(args.run)
    except RunError as error:
        return _fail(str(error))
    out = sys.stdout
    if args.digest:  # what a screen needs of a long run: rare events whole, train events thinned
        from .history import read_history

        damage: list[Damage] = []
        _upto, records = read_history(run.journal, damage)
        for _seq, payload in records:
            out.write(payload.decode("utf-8") + "\n")
        out.flush()
        _warn_damage(run.journal, damage)
        return EXIT_DAMAGED if damage else 0
    tail = JournalTail(run.journal, since=args.since)
    reported = 0

    def drain() -> None:
        nonlocal reported
        for _seq, payload in tail.poll():
            out.write(payload.decode("utf-8") + "\n")
        out.flush()
        _warn_damage(run.journal, tail.damage[reported:])
        reported = len(tail.damage)

    def finish() -> int:
        torn = tail.pending > 0 and not run.is_alive()
        if torn:
            print(f"tunetop: warning: {run.journal}: the last {tail.pending} bytes are not a complete record "
                  "(a write cut short by a crash); `tunetop train --resume` moves them to a side file.", file=sys.stderr)
        return EXIT_DAMAGED if reported or torn else 0

    try:
        while True:
            drain()
            if not args.follow:
                return finish()
            if not run.is_alive():
                drain()
                return finish()
            time.sleep(0.2)
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


def _parse_set_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"'{pair}' is not KEY=VALUE (for example learning_rate=1e-4)")
        out[key.strip()] = value.strip()
    return out


def cmd_control(args: argparse.Namespace) -> int:
    from .client_sync import send_command
    from .runs import resolve

    try:
        run = resolve(args.run)
    except RunError as error:
        return _fail(str(error))
    command_args: dict[str, Any] = {}
    if args.command == "set":
        try:
            command_args = _parse_set_pairs(args.pairs)
        except ValueError as error:
            return _fail(str(error))
    elif args.command == "sample":
        command_args = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature, "raw": args.raw}
    if not run.is_alive():
        if args.command == "status":  # a question a finished run can answer from what it left
            return _recorded_status(run, args.json)
        return _fail(f"run {run.id} has no live engine; `tunetop ls` shows its state.", EXIT_UNREACHABLE)
    try:
        reply = send_command(run, args.command, command_args, timeout=args.timeout)
    except TimeoutError as error:
        return _fail(str(error), EXIT_UNREACHABLE)
    if not reply.ok:
        return _fail(f"{args.command} refused: {reply.error}", EXIT_UNREACHABLE)
    if args.json:
        print(json.dumps({"ok": True, **reply.result}))
    else:
        from .replies import describe

        print(describe(args.command, reply))
    return 0


def _recorded_status(run: Any, as_json: bool) -> int:
    """`tunetop status` of a run with no live engine: its last recorded state (exit 0), or exit 3."""
    status = run.status()
    if not status.get("state"):
        return _fail(f"run {run.id} has no live engine and no recorded state; `tunetop ls` shows it.", EXIT_UNREACHABLE)
    state = status["state"] if status["state"] in ("finished", "failed") else f"{status['state']} (engine gone)"
    if as_json:
        print(json.dumps({"ok": True, "live": False, **status, "state": state}))
        return 0
    parts = [f"{run.id}: {state}"]
    if status.get("reason"):
        parts.append(f"({status['reason']})")
    if status.get("iteration") is not None:
        total = status.get("iterations")
        parts.append(f"at iteration {status['iteration']:,}" + (f" of {total:,}" if isinstance(total, int) else ""))
    if isinstance(status.get("loss"), float):
        parts.append(f"— last train loss {status['loss']:.4f}")
    if isinstance(status.get("val_loss"), float):
        parts.append(f", validation loss {status['val_loss']:.4f}")
    print(" ".join(parts).replace(" ,", ","))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from . import config as config_module
    from .data import DataError
    from .evaluation import EvaluationError, score
    from .runs import resolve
    from .session import ModelError

    run = resolve(args.run)
    cfg = config_module.load(run.config)
    try:
        result = score(run, cfg, args.split, args.checkpoint, args.batches, base=args.base)
    except (EvaluationError, DataError, ModelError) as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps({**result.__dict__, "perplexity": result.perplexity}))
    else:
        print(result.describe())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import EXPORTERS, ExportError, check_output, check_outside_run, saved_iteration
    from .runs import resolve

    run = resolve(args.run)
    output = Path(args.output).expanduser().absolute()
    try:
        check_outside_run(run, output)
        check_output(output, args.force)
        out = EXPORTERS[args.format](run, output, args.checkpoint)
    except ExportError as error:
        return _fail(str(error))
    except OSError as error:  # a folder that cannot be written, a full disk
        return _fail(f"cannot export to {output}: {error.strerror or error}. Choose a folder you can write to.")
    iteration = saved_iteration(run, args.checkpoint)
    what = f"the adapter of iteration {iteration:,}" if iteration is not None else "the latest adapter"
    source = f"checkpoint {args.checkpoint}" if args.checkpoint is not None else "the latest save"
    print(f"exported {what} ({source}) of run {run.id} as {args.format} to {out}")
    return 0


def cmd_export_metrics(args: argparse.Namespace) -> int:
    from .export import metrics_text
    from .runs import resolve

    if args.format == "tensorboard":
        from .journal import read_events
        from .tensorboard import write_from_events

        if not args.output:
            return _fail("--format tensorboard needs --output DIR (the folder to point `tensorboard --logdir` at).")
        folder = Path(args.output)
        if folder.exists() and not folder.is_dir():
            return _fail(f"{folder} is a file; --format tensorboard writes into a folder: give a folder's path.")
        try:
            path = write_from_events(list(read_events(resolve(args.run).journal)), folder)
        except OSError as error:
            return _fail(f"cannot write to {folder}: {error.strerror or error}. Choose a folder you can write to.")
        print(f"wrote {path}")
        return 0
    text = metrics_text(resolve(args.run), args.format)
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            return _fail(f"{output} is a folder; --output names the file to write, e.g. {output / ('metrics.' + args.format)}.")
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as error:
            return _fail(f"cannot write {output}: {error.strerror or error}. Choose a path you can write to.")
    else:
        sys.stdout.write(text)
    return 0


def cmd_import_config(args: argparse.Namespace) -> int:
    from . import config as config_module
    from .import_config import import_yaml

    cfg, imported = import_yaml(Path(args.yaml))
    output = Path(args.output)
    if output.exists() and not args.force:
        return _fail(f"{output} already exists; pass --force to overwrite it.")
    if output.is_dir():
        return _fail(f"{output} is a folder; --output names the TOML file to write, e.g. {output / 'run.toml'}.")
    try:
        config_module.save(cfg, output)
    except OSError as error:
        return _fail(f"cannot write {output}: {error.strerror or error}. Choose a path you can write to.")
    print(f"wrote {output}")
    if imported.filled:
        print("mlx_lm.lora's defaults for what the recipe leaves out (tunetop's own differ):")
        for line in imported.filled:
            print(f"  {line}")
    if imported.notes:
        print("not carried over, or carried with a difference:")
        for note in imported.notes:
            print(f"  {note}")
    if cfg.model.trust_remote_code:
        print(f"warning: trust_remote_code: true was carried over (model.trust_remote_code in {output}): training "
              f"will run the Python code that comes with {cfg.model.path}. Keep it only if you trust that code; "
              "otherwise set it to false.")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout without the bare ``COMMAND`` line above the list of commands."""

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if isinstance(action, argparse._SubParsersAction):
            return text.split("\n", 1)[1]
        return text


def public_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The commands ``tunetop --help`` lists (the internal ones have no help line)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            return [choice.dest for choice in action._choices_actions]
    return []


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """A sentence for a first word that is no command ("" when it is one, or an option)."""
    if not argv or argv[0].startswith("-"):
        return ""
    subparsers = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[union-attr]
    if argv[0] in subparsers.choices:
        return ""
    import difflib

    commands = public_commands(parser)
    near = difflib.get_close_matches(argv[0], commands, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return f"'{argv[0]}' is not a tunetop command.{hint} Commands: {', '.join(commands)} (`tunetop --help` says what each does)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunetop",
        formatter_class=_HelpFormatter,
        description="LoRA fine-tuning on MLX you can watch and steer. `tunetop` alone opens the runs list.",
        epilog="RUN is a run id, a unique prefix of one, or a run name; it defaults to the latest run. "
        "`tunetop COMMAND --help` describes a command's options.",
    )
    # The metavar keeps the internal commands (_engine, _follower, _remote-info) out of the usage
    # line; they are added without help= so they get no line of their own either.
    sub = parser.add_subparsers(dest="name", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help="start a run from a TOML config, or continue one with --resume")
    p.add_argument("config", nargs="?")
    p.add_argument("--detach", action="store_true", help="run the engine in the background; print the run id")
    p.add_argument("--resume", metavar="RUN", nargs="?", const="", help="continue RUN (default: the latest) in place")
    p.add_argument("--from", dest="start_from", type=int, metavar="ITERATION", help="the checkpoint to resume from")
    p.add_argument("--listen", default="", metavar="tcp://ADDR:PORT", help="also serve on TCP, CURVE-encrypted (see `tunetop keys`)")
    p.add_argument("--np", type=int, default=1, metavar="N", help="data-parallel over N processes on this machine")
    p.add_argument("--hosts", default="", metavar="H1,H2,...", help="data-parallel, one rank per host over ssh (H1 = here; [user@]ip[:ssh_port])")
    p.add_argument("--backend", choices=["ring", "mpi", "nccl"], default="ring", help="mx.distributed backend (default ring)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("init", help="write a commented starter config")
    p.add_argument("path")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("demo", help="train the embedded default model, with the TUI on a terminal")
    p.add_argument("--headless", action="store_true", help="no TUI, print progress lines")
    p.add_argument("--iterations", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attach", help="open the TUI on a run: RUN, or user@host[:port]:RUN over ssh")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--theme")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("ls", help="list runs, here or on HOST (user@host[:port], over ssh)")
    p.add_argument("host", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="also the runs that failed before training (hidden by default)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("events", help="print a run's events as JSON lines")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--digest", action="store_true", help="a long run's digest: rare events whole, train events thinned")
    p.set_defaults(func=cmd_events)

    for name, what in CONTROL_HELP.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("run", nargs="?", help=RUN_HELP)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
        p.set_defaults(func=cmd_control, command=name)
    p = sub.add_parser("sample", help="complete a prompt with a live run's current weights (between steps)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is; by default it is formatted as the run's data was (the chat template for chat data)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
    p.set_defaults(func=cmd_control, command="sample")
    p = sub.add_parser("set", help="change a live run's settings: " + ", ".join(LIVE_FIELDS))
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
    p.set_defaults(func=cmd_control, command="set")

    p = sub.add_parser("test", help="score a run's saved adapter on its test split (or another): loss and perplexity")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--split", choices=["test", "valid", "train"], default="test")
    p.add_argument("--checkpoint", type=int, metavar="ITERATION", help="a checkpoint instead of the latest adapter")
    p.add_argument("--batches", type=int, default=0, help="batches of training.batch_size to score; 0 = the whole split")
    p.add_argument("--base", action="store_true", help="the base model without the adapter, for comparison")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a sentence")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("export", help="export a run's adapter: mlx (adapter folder), peft, or fused (merged model)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--format", choices=["mlx", "peft", "fused"], required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint", type=int, metavar="ITERATION", help="a checkpoint instead of the latest adapter")
    p.add_argument("--force", action="store_true", help="write into a non-empty --output folder (same-named files are replaced)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-metrics", help="a run's training and validation metrics as CSV or JSON lines")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--format", choices=["csv", "jsonl", "tensorboard"], default="csv")
    p.add_argument("--output")
    p.set_defaults(func=cmd_export_metrics)

    p = sub.add_parser("import-config", help="turn an mlx_lm.lora YAML config into a tunetop TOML config")
    p.add_argument("yaml")
    p.add_argument("--output", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_import_config)

    p = sub.add_parser("keys", help="make and print your client key for TCP listeners")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("_remote-info")
    p.add_argument("run", nargs="?", default="")
    p.set_defaults(func=cmd_remote_info)

    p = sub.add_parser("_engine")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--from", dest="start_from", type=int)
    p.add_argument("--listen", default="")
    p.add_argument("--np", type=int, default=1)
    p.add_argument("--hosts", default="")
    p.add_argument("--backend", default="ring")
    p.add_argument("--launched", action="store_true", help="started by mlx.launch: MLX_RANK says which rank")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("_follower")
    p.add_argument("--backend", default="ring")
    p.set_defaults(func=cmd_follower)
    for choice in sub._choices_actions:  # `tunetop X --help` starts with the line `tunetop --help` gives X
        sub.choices[choice.dest].description = choice.help
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # `tunetop set KEY=VALUE` without a run: argparse would take KEY=VALUE as the run.
    if len(argv) >= 2 and argv[0] == "set" and "=" in argv[1]:
        argv = ["set", "", *argv[1:]]
    unknown = _unknown_command(parser, argv)
    if unknown:
        return _fail(unknown)
    args = parser.parse_args(argv)
    if args.name is None:
        return _attach(None, None, runs_list=True)
    try:
        return int(args.func(args))
    except ConfigError as error:
        return _fail(str(error))
    except (RunError, SocketError) as error:
        return _fail(str(error))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" {error.filename}" if error.filename else ""
        return _fail(f"cannot use{where}: {error.strerror}. Free some space (or fix the folder's permissions) "
                     "and try again.", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
