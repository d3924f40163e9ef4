"""`tunetop compare [RUN|TAG ...] [--json]`: runs side by side, here or over ssh.

The runs are named one by one, or by a tag they carry (a sweep's ``sweep:ID``, or its ID), or
not at all: then the latest group (tunetop.runs.groups). Each run's history digest (tunetop.control.history: every rare event, train events thinned) is
folded into a RunState, and tunetop.tui.compare makes the table; a remote run (``HOST:RUN``)
sends its digest over the ssh path of remote attach (``tunetop events --digest`` there). Nothing
here imports Textual or mlx: the fold and the table are pure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tunetop.cli.common import _fail
from tunetop.exit_codes import EXIT_UNREACHABLE
from tunetop.runs.folders import RunError


def _fold(run_id: str, events: list[dict[str, Any]]) -> Any:
    from tunetop.tui.state import RunState

    state = RunState(run_id=run_id)
    state.apply_all(events)
    return state


def local_entry(run: Any) -> Any:
    """A local run's :class:`tunetop.tui.compare.Entry`, from its history digest."""
    from tunetop.control.history import read_history
    from tunetop.control.journal import Damage
    from tunetop.control.protocol import loads
    from tunetop.tui.compare import Entry

    damage: list[Damage] = []
    try:
        _upto, records = read_history(run.journal, damage)
    except FileNotFoundError:  # an engine that never got to write its first event
        records = []
    for stretch in damage:
        print(f"tunetop: warning: {run.journal}: skipped {stretch.describe()}; the comparison uses every intact record.",
              file=sys.stderr)
    alive = run.is_alive()
    return Entry(run.id, _fold(run.id, [loads(payload) for _seq, payload in records]), alive, time.time() if alive else None)


def remote_entry(spec: str) -> Any:
    """A remote run's Entry (``user@host[:port]:RUN``), over ssh; RemoteError says why not."""
    from tunetop.runs.ssh import RemoteError, parse_target, run_remote
    from tunetop.tui.compare import Entry
    from tunetop.tui.remote import remote_info

    target = parse_target(spec)
    info = remote_info(target)  # resolves the run (id, prefix or name) and checks the protocol
    run_id = str(info.get("run", ""))
    output = run_remote(target, ["events", "--digest", run_id], timeout=120.0)
    try:
        events = [json.loads(line) for line in output.splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise RemoteError(f"the remote tunetop on {target} sent events that are not JSON lines.") from None
    # The remote machine's clock counts a live run's time: its last event is as far as we know.
    return Entry(f"{target}:{run_id}", _fold(run_id, events), bool(info.get("alive")), None)


def local_runs(specs: list[str]) -> list[Any]:
    """The local runs ``specs`` name: a run (id, prefix, name) or, when no run matches, every run
    carrying that tag (or ``sweep:SPEC``); RunError when neither. No spec: the latest group."""
    from tunetop.runs.folders import resolve
    from tunetop.runs.groups import group_of, latest_group

    if not specs:
        group = latest_group()
        if group is None:
            raise RunError("nothing to compare: no run has a tag. Name the runs (`tunetop compare RUN RUN...`), or "
                           "tag them (`tunetop tag RUN +NAME`, or tags = [...] in their configs; a sweep tags its runs).")
        tag, runs = group
        if len(runs) < 2:
            raise RunError(f"nothing to compare: the newest tag, '{tag}', is on one run only ({runs[0].id}). Name the "
                           "runs (`tunetop compare RUN RUN...`) or a tag that several carry (`tunetop compare TAG`).")
        print(f"tunetop: comparing the {len(runs)} runs tagged {tag} (the newest run's tag)", file=sys.stderr)
        return list(runs)
    found = []
    for spec in specs:
        try:
            found.append(resolve(spec))
        except RunError:
            group = group_of(spec)
            if group is None:
                raise
            found.extend(group[1])
    return found


def cmd_compare(args: argparse.Namespace) -> int:
    from tunetop.runs.ssh import RemoteError, is_remote
    from tunetop.tui.compare import compare

    specs: list[str] = args.runs
    local_specs = [spec for spec in specs if not is_remote(spec)]
    try:
        runs = local_runs(local_specs) if local_specs or not specs else []
        entries = [local_entry(run) for run in {run.id: run for run in runs}.values()]  # a run once, however named
        entries += [remote_entry(spec) for spec in specs if is_remote(spec)]
    except RemoteError as error:
        return _fail(str(error), EXIT_UNREACHABLE)
    except RunError as error:
        return _fail(str(error))
    entries = list({entry.label: entry for entry in entries}.values())
    if len(entries) < 2:
        return _fail("compare needs two runs or more: `tunetop compare RUN RUN...` (ids, prefixes, names, "
                     "user@host[:port]:RUN, or a tag the runs carry); `tunetop ls` lists the runs.")
    comparison = compare(entries)
    if args.json:
        print(json.dumps(comparison.to_json()))
    else:
        print(comparison.text())
    return 0
