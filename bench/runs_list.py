"""How fast the runs list opens with hundreds of recorded runs.

    python bench/runs_list.py [--runs 500] [--repeat 3]

Makes N recorded runs in a temporary TUNETOP_HOME (each a real run folder: config.toml with
tags, a journal with run_started, train, validation, tags, note and finished events, and the
status.json an engine leaves; one in ten failed before training), then times, in the real app
headless (Textual's run_test): the app's start to the runs list showing every row (and, for
reference, to an empty list), and `tunetop ls` as a subprocess. Prints the best and the median of ``--repeat`` openings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx)

TAG_POOL = ("baseline", "lr-sweep", "rank-sweep", "chat", "long-context", "sweep:20261129-1010", "keep")


def make_runs(home: Path, count: int) -> list[str]:
    """``count`` recorded runs under ``home``/runs, as engines leave them; returns their ids, oldest first.

    Run i: finished (or, every tenth, failed before training), tags from TAG_POOL, a note on
    every third, a best validation loss that varies with i.
    """
    from tunetop.control.journal import JournalWriter
    from tunetop.control.protocol import make_event
    from tunetop.runs.folders import RunDir
    from tunetop.runs.labels import Labels, status_labels

    ids = []
    root = home / "runs"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        run = RunDir(root / f"20261129-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:04x}")
        run.path.mkdir(mode=0o700)
        config_tags = [TAG_POOL[i % 3]]
        later_tags = [*config_tags, TAG_POOL[3 + i % 4]] if i % 2 else config_tags
        note = f"run {i}: tried lr {1e-5 * (1 + i % 7):.0e}" if i % 3 == 0 else ""
        name = f"exp-{i % 25}"
        run.config.write_text(f'name = "{name}"\ntags = {json.dumps(config_tags)}\n[training]\niterations = 100\n')
        failed = i % 10 == 9
        writer = JournalWriter(run.journal)
        t0 = 1_800_000_000.0 + i * 60

        def add(type_: str, **fields: object) -> None:
            writer.append(make_event(run.id, writer.last_seq + 1, type_, ts=t0 + writer.last_seq, **fields))  # noqa: B023

        add("state", state="starting")
        if failed:
            add("error", message="data/train.jsonl: no such file")
            add("state", state="failed")
            add("finished", reason="bad_input", iteration=0)
            status = {"name": name, "iterations": 100, "state": "failed", "reason": "bad_input",
                      **status_labels(Labels(config_tags, ""))}
        else:
            add("run_started", config={"tags": config_tags}, model="embedded", trainable_parameters=1,
                total_parameters=2, iterations=100, name=name)
            add("state", state="running")
            best = 9.0
            for it in range(10, 101, 10):
                add("train", iteration=it, loss=3.0 - it / 100 + (i % 13) / 10, learning_rate=1e-4,
                    iterations_per_second=5.0, tokens_per_second=1000.0, trained_tokens=it * 100, peak_memory=0.1)
                if it % 50 == 0:
                    loss = 2.5 - it / 200 + (i % 17) / 20
                    best = min(best, loss)
                    add("validation", iteration=it, loss=loss, seconds=0.1)
            if later_tags != config_tags:
                add("tags", tags=later_tags)
            if note:
                add("note", text=note)
            add("state", state="finished")
            add("finished", reason="completed", iteration=100)
            status = {"name": name, "iterations": 100, "state": "finished", "reason": "completed", "iteration": 100,
                      "loss": 2.0 + (i % 13) / 10, "val_loss": best, "best_val_loss": best, "best_val_iteration": 100,
                      "trained": True, **status_labels(Labels(later_tags, note))}
        writer.close()
        run.write_status(status)
        ids.append(run.id)
    return ids


async def open_list(expected: int) -> float:
    """Seconds from the app's start until the runs list shows ``expected`` rows."""
    from textual.widgets import DataTable

    from tunetop.tui.app import TunetopApp

    app = TunetopApp(None, remember=False)
    start = time.perf_counter()
    async with app.run_test(size=(180, 50)) as pilot:
        table = app.screen.query_one(DataTable)
        while table.row_count < expected:
            await pilot.pause(0.005)
        elapsed = time.perf_counter() - start
        await pilot.press("q")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tt-bench-runs-"))
    os.environ["TUNETOP_HOME"] = str(home)
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    (home / "runs").mkdir(parents=True)
    empty = [asyncio.run(open_list(0)) for _ in range(args.repeat)]
    print(f"runs list open, no runs (the app's own start): best {min(empty):.3f}s, median {statistics.median(empty):.3f}s")
    started = time.perf_counter()
    make_runs(home, args.runs)
    shown = args.runs - args.runs // 10  # the failed-before-training tenth is hidden
    print(f"made {args.runs} recorded runs in {time.perf_counter() - started:.1f}s under {home}")
    opens = [asyncio.run(open_list(shown)) for _ in range(args.repeat)]
    print(f"runs list open, {shown} rows shown: best {min(opens):.3f}s, median {statistics.median(opens):.3f}s")
    ls = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tunetop.cli", "ls"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        ls.append(time.perf_counter() - start)
    print(f"`tunetop ls` ({args.runs} runs, whole process): best {min(ls):.3f}s, median {statistics.median(ls):.3f}s")
    import shutil

    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
