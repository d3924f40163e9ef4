"""A recorded, deterministic event stream of a finished run, for TUI tests and snapshots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunetop.control.journal import JournalWriter
from tunetop.control.protocol import make_event
from tunetop.runs.folders import RunDir

RUN_ID = "20261129-120000-abcd"
T0 = 1_800_000_000.0


def recorded_events(
    iterations: int = 400, report: int = 10, evaluate: int = 50, save: int = 100, run_id: str = RUN_ID
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def add(type_: str, t: float, **fields: Any) -> None:
        events.append(make_event(run_id, len(events) + 1, type_, ts=T0 + t, **fields))

    add("state", 0.0, state="starting")
    add(
        "run_started",
        0.5,
        config={"training": {"steps_per_report": report, "steps_per_eval": evaluate, "validation_batches": 10},
                "checkpoints": {"save_every": save}},
        model="/models/embedded-llama",
        trainable_parameters=65_536,
        total_parameters=718_720,
        iterations=iterations,
        name="recorded",
    )
    add("state", 0.6, state="running")
    add("validation", 1.0, iteration=0, loss=10.5, seconds=0.25)
    for it in range(report, iterations + 1, report):
        t = 1.0 + it * 0.05
        loss = 1.5 + 9.0 * math.exp(-it / 40) + 0.2 * math.sin(it / 7)
        add("train", t, iteration=it, loss=loss, learning_rate=5e-4, iterations_per_second=20.0,
            tokens_per_second=3000.0 + 100 * math.sin(it), trained_tokens=it * 150, peak_memory=0.052)
        if it % evaluate == 0:
            add("validation", t + 0.01, iteration=it, loss=1.4 + 8.0 * math.exp(-it / 45), seconds=0.22)
        if it % save == 0:
            add("save", t + 0.02, iteration=it, path=f"/runs/{RUN_ID}/adapters/adapters.safetensors", kind="adapter")
        if it == 200:
            add("warning", t + 0.03, message="valid.jsonl: some sequences are longer than max_seq_length=2048")
    add("state", 1.0 + iterations * 0.05 + 0.1, state="finished")
    add("finished", 1.0 + iterations * 0.05 + 0.2, reason="completed", iteration=iterations)
    return events


def write_recorded_run(home: Path, events: list[dict[str, Any]] | None = None, run_id: str = RUN_ID) -> RunDir:
    """A finished run folder (no engine) whose journal holds the recorded events."""
    run = RunDir(home / "runs" / run_id)
    run.path.mkdir(parents=True, exist_ok=True)
    writer = JournalWriter(run.journal)
    for event in events or recorded_events(run_id=run_id):
        writer.append(event)
    writer.close()
    run.write_status({"name": "recorded", "state": "finished", "iteration": 400, "iterations": 400, "loss": 1.6})
    (run.path / "config.toml").write_text('name = "recorded"\n\n[training]\niterations = 400\n')
    return run
