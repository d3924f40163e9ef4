"""The queue and sweeps: `tunetop queue [add|rm|up|down|pause|resume]`, `tunetop sweep`, and the internal `_scheduler`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tunetop.cli.common import _fail
from tunetop.exit_codes import EXIT_UNREACHABLE

QUEUE_ACTIONS = ("add", "rm", "up", "down", "pause", "resume")


def cmd_scheduler(_args: argparse.Namespace) -> int:
    """Internal: the scheduler process (tunetop.runs.scheduler), started detached by ensure_scheduler."""
    from tunetop.runs.scheduler import Scheduler

    return Scheduler().run()


def _remote(args: argparse.Namespace, words: list[str]) -> int:
    """Run ``tunetop queue WORDS`` on ``args.host`` over ssh and print what it prints."""
    from tunetop.runs.ssh import RemoteError, parse_target, run_remote

    try:
        print(run_remote(parse_target(args.host, with_run=False), ["queue", *words]), end="")
    except RemoteError as error:
        return _fail(str(error), EXIT_UNREACHABLE)
    return 0


def _remote_words(args: argparse.Namespace) -> list[str]:
    action = args.action
    words = [action] if action else []
    if action == "add":
        words += [*args.configs, *(["--name", args.run_name] if args.run_name else [])]
    elif action in ("rm", "up", "down"):
        words.append(args.entry)
    if args.parallel is not None:
        words += ["--parallel", str(args.parallel)]
    if not action and args.json:
        words.append("--json")
    return words


def cmd_queue(args: argparse.Namespace) -> int:
    from tunetop.runs.queue import QueueError, edit_queue, set_parallel

    if args.host:
        return _remote(args, _remote_words(args))
    if problem := _parallel_problem(args.parallel):
        return _fail(problem)
    action = args.action
    try:
        if action == "add":
            return _add(args)
        if action in ("rm", "up", "down", "pause", "resume") or args.parallel is not None:
            with edit_queue() as queue:
                said = _edit(queue, args)
                if args.parallel is not None:
                    set_parallel(queue, args.parallel)
                    said = said or f"the queue runs {args.parallel} at a time."
            if said:
                print(said)
    except QueueError as error:
        return _fail(str(error))
    if action in ("rm", "up", "down", "pause"):
        return 0
    return _show(args.json if not action else False)


def _parallel_problem(parallel: int | None) -> str:
    from tunetop.runs.queue import MAX_PARALLEL

    if parallel is not None and not 1 <= parallel <= MAX_PARALLEL:
        return f"--parallel must be between 1 and {MAX_PARALLEL}, got {parallel}."
    return ""


def _edit(queue: Any, args: argparse.Namespace) -> str:
    action = args.action
    if action == "rm":
        entry = queue.remove(args.entry)
        return f"removed queue entry {entry.id} ({entry.name})" + (f"; run {entry.run} stays" if entry.run else "")
    if action in ("up", "down"):
        entry = queue.move(args.entry, -1 if action == "up" else 1)
        place = [e.id for e in queue.pending()].index(entry.id) + 1
        return f"queue entry {entry.id} ({entry.name}) is now {_ordinal(place)} in line"
    if action == "pause":
        queue.paused = True
        return "queue paused: no new run starts (runs that are training go on); `tunetop queue resume` continues it."
    if action == "resume":
        queue.paused = False
        return ""
    return ""


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _add(args: argparse.Namespace) -> int:
    """Validate every config, then queue them all in one write (none when one is bad)."""
    from tunetop.runs.launch import load_run_config
    from tunetop.runs.queue import add_configs

    if args.run_name and len(args.configs) > 1:
        return _fail("--name names one run: give one CONFIG with it (a config's own `name` names the others).")
    configs = [load_run_config(path) for path in args.configs]  # ConfigError: main() prints it, exit 2
    if problem := _name_problem(args.run_name):
        return _fail(problem)
    if args.run_name:
        configs[0].name = args.run_name
    entries = add_configs(configs, [str(p) for p in args.configs])
    for entry in entries:
        print(f"queued {entry.id}: {entry.name} ({entry.source})")
    return _after_queueing(args.parallel)


def _after_queueing(parallel: int | None) -> int:
    from tunetop.runs.queue import edit_queue, set_parallel

    if parallel is not None:
        with edit_queue() as queue:
            set_parallel(queue, parallel)
    _wake(quiet=False)
    return 0


def _wake(quiet: bool) -> None:
    """Start the scheduler when there is something for it to do and none runs."""
    from tunetop.runs.queue import load_queue
    from tunetop.runs.scheduler import ensure_scheduler

    queue = load_queue()
    if queue.active() or (queue.pending() and not queue.paused):
        pid = ensure_scheduler()
        if pid is not None and not quiet:
            print(f"scheduler started (pid {pid}); `tunetop queue` shows the queue.")
    if queue.paused and queue.pending() and not quiet:
        print("the queue is paused: `tunetop queue resume` starts its runs.")


def _rows(queue: Any) -> list[dict[str, Any]]:
    """The entries as shown: active first, then pending in order, then ended ones, oldest first."""
    from tunetop.runs.folders import RunDir, runs_root
    from tunetop.runs.queue import ACTIVE, ENDED, PENDING

    order = [e for e in queue.entries if e.state in ACTIVE] + [e for e in queue.entries if e.state == PENDING]
    order += sorted((e for e in queue.entries if e.state in ENDED), key=lambda e: e.ended)
    rows = []
    for place, entry in enumerate(order, start=1):
        row: dict[str, Any] = {"id": entry.id, "state": entry.state, "run": entry.run, "name": entry.name,
                               "source": entry.source, "sweep": entry.sweep}
        if entry.state == PENDING:
            row["position"] = place - len(queue.active())
        if entry.state in ACTIVE and entry.run:
            status = RunDir(runs_root() / entry.run).status()
            row["iteration"], row["iterations"] = status.get("iteration", 0), status.get("iterations")
            row["run_state"] = status.get("state", "")
        if entry.state in ENDED:
            row["reason"] = entry.reason
            if entry.error:
                row["error"] = entry.error
        rows.append(row)
    return rows


def _show(as_json: bool) -> int:
    from tunetop.runs.queue import load_queue
    from tunetop.runs.scheduler import scheduler_pid

    _wake(quiet=True)  # after a crash or a reboot: the header then names the scheduler started
    queue = load_queue()
    pid = scheduler_pid()
    rows = _rows(queue)
    if as_json:
        print(json.dumps({"paused": queue.paused, "parallel": queue.parallel, "scheduler": pid, "entries": rows}))
        return 0
    state = "paused" if queue.paused else "running" if pid else "idle"
    print(f"queue: {state}, {queue.parallel} at a time" + (f", scheduler pid {pid}" if pid else ""))
    if not rows:
        print("nothing queued; `tunetop queue add CONFIG` or `tunetop sweep CONFIG --set KEY=V1,V2` queues runs.")
        return 0
    table = [("ID", "STATE", "RUN", "NAME", "DETAIL")]
    for row in rows:
        table.append((str(row["id"]), row["state"], row["run"] or "-", row["name"], _detail(row)))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths, strict=True)) + "  " + line[4])
    return 0


def _detail(row: dict[str, Any]) -> str:
    if "position" in row:
        return f"{_ordinal(row['position'])} in line" + (f" ({row['source']})" if row["source"] else "")
    if "iteration" in row:
        total = row.get("iterations")
        run_state = row.get("run_state") or "starting"
        return f"{run_state} {row['iteration']}/{total if total else '?'}"
    text = row.get("reason", "")
    return f"{text}: {row['error']}" if row.get("error") else text


def cmd_sweep(args: argparse.Namespace) -> int:
    """Expand the grid, validate every combination, then queue them all (tunetop.runs.sweep)."""
    from tunetop.runs.launch import load_run_config
    from tunetop.runs.queue import add_configs
    from tunetop.runs.sweep import SweepError, expand, new_sweep_id, parse_axis

    if problem := _parallel_problem(args.parallel):
        return _fail(problem)
    cfg = load_run_config(args.config)  # ConfigError: main() prints it, exit 2
    if problem := _name_problem(args.run_name):
        return _fail(problem)
    if args.run_name:
        cfg.name = args.run_name
    if args.seed is not None and not args.random:
        return _fail("--seed chooses which combinations --random N draws; give it with --random.")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    sweep_id = new_sweep_id()
    try:
        combinations = expand(cfg, [parse_axis(spec) for spec in args.set], args.random, seed, sweep_id)
    except SweepError as error:
        return _fail(str(error))
    drawn = f" (drawn with --seed {seed})" if args.random else ""
    if args.dry_run:
        for combination in combinations:
            print(combination.config.name)
        print(f"{len(combinations)} runs{drawn}; nothing queued (--dry-run).")
        return 0
    entries = add_configs([c.config for c in combinations], [str(args.config)] * len(combinations), sweep=sweep_id)
    for entry in entries:
        print(f"queued {entry.id}: {entry.name}")
    print(f"sweep {sweep_id}: {len(entries)} runs{drawn}, tagged sweep:{sweep_id}; `tunetop queue` shows them.")
    return _after_queueing(args.parallel)


def add_parsers(sub: Any) -> None:
    """`queue` and `sweep` on the CLI's parser, and the internal `_scheduler`."""
    p = sub.add_parser("queue", help="runs waiting their turn: list (--json), add CONFIG..., rm|up|down ID, pause|resume")
    _host_and_parallel(p, argparse.SUPPRESS, parallel=True)
    p.set_defaults(host="", parallel=None)
    p.add_argument("--json", action="store_true", help="the queue as one JSON object, for scripts")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    a = actions.add_parser("add", help="validate CONFIG files and queue them, in order")
    a.add_argument("configs", nargs="+", metavar="CONFIG")
    a.add_argument("--name", dest="run_name", default="", help="the run's name (one CONFIG only)")
    _host_and_parallel(a, argparse.SUPPRESS, parallel=True)
    for name, what in (("rm", "remove a pending entry (cancel it), or forget an ended one"),
                       ("up", "move a pending entry one place earlier"), ("down", "move a pending entry one place later")):
        a = actions.add_parser(name, help=what)
        a.add_argument("entry", metavar="ID", help="the entry's number (`tunetop queue` lists them), or its run id or name")
        _host_and_parallel(a, argparse.SUPPRESS, parallel=False)
    a = actions.add_parser("pause", help="start no new run (running ones go on)")
    _host_and_parallel(a, argparse.SUPPRESS, parallel=False)
    a = actions.add_parser("resume", help="start queued runs again")
    _host_and_parallel(a, argparse.SUPPRESS, parallel=True)
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("sweep", help="queue one run per combination of --set values (a grid, or --random N of it)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a config key and its values, e.g. optimizer.learning_rate=1e-5,3e-5 (repeat for more keys)")
    p.add_argument("--random", type=int, default=0, metavar="N", help="queue N combinations drawn at random, not the whole grid")
    p.add_argument("--seed", type=int, help="the draw of --random (default: from the clock, printed)")
    p.add_argument("--name", dest="run_name", default="", help="the runs' name before their values (default: the config's)")
    p.add_argument("--parallel", type=int, metavar="N", help="run N queued runs at a time (remembered)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' names; queue nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("_scheduler")
    p.set_defaults(func=cmd_scheduler)


def _host_and_parallel(parser: argparse.ArgumentParser, default: Any, parallel: bool) -> None:
    # SUPPRESS: an option left out at one level must not reset what another level was given.
    parser.add_argument("--host", default=default, metavar="HOST", help="the queue of HOST (user@host[:port]), over ssh")
    if parallel:
        parser.add_argument("--parallel", type=int, default=default, metavar="N",
                            help="run N queued runs at a time (remembered; default 1)")


def main_argv(argv: list[str]) -> list[str]:
    """`tunetop queue HOST[:] [...]` (as `tunetop ls HOST`): the host as --host."""
    from tunetop.runs.ssh import is_remote

    if len(argv) >= 2 and argv[0] == "queue" and is_remote(argv[1]):
        host = argv[1][:-1] if argv[1].endswith(":") else argv[1]
        return ["queue", *argv[2:], "--host", host]
    return argv


def _name_problem(name: str) -> str:
    """Why ``--name`` cannot name runs ("" when it can): it is shown in every list, so no control
    characters (escape sequences, line breaks)."""
    from tunetop.training.config import control_character

    bad = control_character(name)
    return f"--name holds the control character {bad}, which would reach terminals as a command; use printable text." if bad else ""
