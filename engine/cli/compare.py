"""`tunetop compare RUN RUN... [--json]`: runs side by side, here or over ssh.

Each run's history digest (tunetop.control.history: every rare event, train events thinned) is
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


def local_entry(spec: str) -> Any:
    """A local run's :class:`tunetop.tui.compare.Entry`, from its history digest."""
    from tunetop.control.history import read_history
    from tunetop.control.journal import Damage
    from tunetop.control.protocol import loads
    from tunetop.runs.folders import resolve
    from tunetop.tui.compare import Entry

    run = resolve(spec)
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


def cmd_compare(args: argparse.Namespace) -> int:
    from tunetop.runs.ssh import RemoteError, is_remote
    from tunetop.tui.compare import compare

    specs: list[str] = args.runs
    if len(specs) < 2:
        return _fail("compare needs two runs or more: `tunetop compare RUN RUN...` (ids, prefixes, names, or "
                     "user@host[:port]:RUN); `tunetop ls` lists the runs.")
    entries = []
    for spec in specs:
        try:
            entries.append(remote_entry(spec) if is_remote(spec) else local_entry(spec))
        except RemoteError as error:
            return _fail(str(error), EXIT_UNREACHABLE)
        except RunError as error:
            return _fail(str(error))
    labels = [entry.label for entry in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        return _fail(f"{', '.join(twice)} named more than once: give each run once.")
    comparison = compare(entries)
    if args.json:
        print(json.dumps(comparison.to_json()))
    else:
        print(comparison.text())
    return 0
