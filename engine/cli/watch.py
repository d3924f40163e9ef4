"""Runs and their engines: `ls`, `attach`, `events`, the commands that steer a live run, `keys`, `_remote-info`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tunetop.cli.common import _fail
from tunetop.exit_codes import EXIT_DAMAGED, EXIT_UNREACHABLE
from tunetop.runs.folders import RunError


def _attach(spec: str | None, theme: str | None, runs_list: bool = False) -> int:
    try:
        from tunetop.runs.ssh import is_remote
        from tunetop.tui.app import run_app, run_remote_app
    except ImportError as error:
        return _fail(f"the TUI cannot start: {error}")
    if is_remote(spec):
        return run_remote_app(str(spec), theme=theme)
    return run_app(spec, theme=theme, runs_list=runs_list)


def cmd_attach(args: argparse.Namespace) -> int:
    return _attach(args.run, args.theme)


def cmd_remote_info(args: argparse.Namespace) -> int:
    """Internal, run over ssh by a remote client: where a run's sockets are, as JSON."""
    from tunetop.control.protocol import PROTOCOL_VERSION
    from tunetop.runs.client_sync import run_endpoints
    from tunetop.runs.folders import resolve

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


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _ls_record(run: Any, s: dict[str, Any]) -> dict[str, Any]:
    """One run of `ls --json`: raw values for scripts (numbers, booleans, an ISO 8601 time in UTC),
    where the table shows them formatted for people."""
    import datetime

    status = run.status()
    iteration, iterations, loss = status.get("iteration"), status.get("iterations"), status.get("loss")
    updated = time.time() - s["age_seconds"]  # what AGE counts from
    return {
        "run": s["run"],
        "name": s["name"],
        "state": s["state"],
        "iteration": None if s["failed_before_training"] or not isinstance(iteration, int) else iteration,
        "iterations": iterations if isinstance(iterations, int) else None,
        "loss": float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None,
        "alive": bool(s["alive"]),
        "trained": bool(s["trained"]),
        "updated": datetime.datetime.fromtimestamp(updated, datetime.UTC).isoformat(timespec="seconds"),
        "age_seconds": round(s["age_seconds"], 3),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    from tunetop.runs.folders import list_runs

    if args.host:
        from tunetop.runs.ssh import RemoteError, parse_target, run_remote

        try:
            flags = [*(["--json"] if args.json else []), *(["--all"] if args.all else [])]
            print(run_remote(parse_target(args.host, with_run=False), ["ls", *flags]), end="")
        except RemoteError as error:
            return _fail(str(error), EXIT_UNREACHABLE)
        return 0

    from tunetop.runs.labels import labels_of

    rows = []
    records = []
    hidden = 0
    for run in list_runs():
        status = run.status()
        s = run.summary(status)
        if s["failed_before_training"] and not args.all:  # a config or data mistake: nothing to see
            hidden += 1
            continue
        labels = labels_of(run, status)
        best = s["best_val_loss"]
        note = labels.note_line
        rows.append(
            (s["run"], s["name"], s["state"], s["iter"], s["loss"], "-" if best is None else f"{best:.4f}",
             "yes" if s["alive"] else "no", _age(s["age_seconds"]), ",".join(labels.tags) or "-",
             note if len(note) <= 40 else note[:39] + "…")
        )
        if args.json:
            records.append({**_ls_record(run, s), "best_val_loss": best, "best_val_iteration": s["best_val_iteration"],
                            "tags": labels.tags, "note": labels.note})
    header = ("RUN", "NAME", "STATE", "ITER", "LOSS", "BEST_VAL", "ALIVE", "AGE", "TAGS", "NOTE")
    if args.json:
        for record in records:
            print(json.dumps(record))
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
    from tunetop.control.journal import Damage, JournalTail
    from tunetop.runs.folders import resolve

    try:
        run = resolve(args.run)
    except RunError as error:
        return _fail(str(error))
    out = sys.stdout
    if args.digest:  # what a screen needs of a long run: rare events whole, train events thinned
        from tunetop.control.history import read_history

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
    from tunetop.runs.client_sync import send_command
    from tunetop.runs.folders import resolve

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
        if args.checkpoint is not None:  # a saved adapter, loaded in this process
            from tunetop.cli.outputs import cmd_sample_saved

            return cmd_sample_saved(args, run)
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
        from tunetop.control.replies import describe

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


def cmd_keys(_args: argparse.Namespace) -> int:
    """Make (once) and print this user's client key for TCP listeners."""
    from tunetop.control.security import clients_dir, make_client_keys

    public = make_client_keys()
    print(f"client public key: {public}")
    print(f"authorize it on the engine's machine: copy it into {clients_dir()}/ (any name ending in .key)")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Block until a run ends, or pauses on a non-finite step; exit with that ending's code
    (runs.notify.WAIT_CODES). A run that has already ended answers at once."""
    from tunetop.control.journal import JournalTail
    from tunetop.runs.folders import resolve
    from tunetop.runs.notify import WAIT_CODES, WAIT_ENGINE_GONE, WAIT_TIMED_OUT, Ending, describe

    try:
        run = resolve(args.run)
    except RunError as error:
        return _fail(str(error))
    if args.timeout < 0:
        return _fail(f"--timeout {args.timeout:g}: give seconds, or 0 to wait as long as the run takes.")
    tail = JournalTail(run.journal, since=0)
    ending = Ending()
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    try:
        while True:
            alive = run.is_alive()  # asked first: an engine gone by now has written all it will
            for _seq, payload in tail.poll():
                ending.apply(json.loads(payload))
            if ending.event is not None:
                break
            if not alive:
                print(f"tunetop: run {run.id}: its engine ended without finishing the run (killed, or the machine "
                      f"went down); `tunetop train --resume {run.id}` continues it.", file=sys.stderr)
                return WAIT_ENGINE_GONE
            if deadline is not None and time.monotonic() > deadline:
                print(f"tunetop: run {run.id} is still going after {args.timeout:g} s.", file=sys.stderr)
                return WAIT_TIMED_OUT
            time.sleep(0.3)
    except KeyboardInterrupt:
        return 130
    _title, body = describe(ending.event)
    print(f"{run.id}: {'paused: ' if ending.reason == 'paused_nonfinite' else ''}{body}")
    return WAIT_CODES.get(ending.reason, WAIT_CODES["failed"])
