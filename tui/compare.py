"""A comparison of runs: one row per run, and the config keys whose values differ between them.

From each run's :class:`~tunetop.tui.state.RunState` (folded from its history digest, or from
its live events), :func:`compare` makes what ``tunetop compare`` prints and the comparison
screen shows: state, best validation loss and where, last train loss, tokens/s, trained
tokens, training time, and only the config keys (dotted names, ``optimizer.learning_rate``)
whose values are not the same in every run. Runs are ranked by best validation loss. Pure: no
I/O, no Textual, no mlx, so the CLI uses it on a machine without either.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from tunetop.tui.state import ACTIVE_STATES, RunState, format_count, format_duration

IGNORED_KEYS = frozenset({"name", "tags"})
"""Top-level config keys that say who a run is, not how it trains: the table shows them already."""

MISSING = object()
"""A key one run's config does not have (a run of an older version)."""


@dataclass
class RunSummary:
    """One row of the comparison."""

    run: str  # the run id; HOST:ID for a remote run
    name: str
    state: str
    iteration: int
    iterations: int
    best_validation_loss: float | None
    best_validation_iteration: int | None
    last_train_loss: float | None
    tokens_per_second: float | None  # the median of the run's reports: one slow step moves it little
    trained_tokens: int
    elapsed_seconds: float  # training time: pauses and loading left out, as the dashboard counts it
    config: dict[str, Any] = field(default_factory=dict)  # the differing keys only; None where a run lacks one
    tags: list[str] = field(default_factory=list)
    note: str = ""

    def cells(self, keys: list[str], labels: tuple[str, ...] = ()) -> list[str]:
        """The row as text: the columns of :data:`HEADER`, the ``labels`` asked for (``tags``,
        ``note``: its first line), then one per differing key."""
        note = self.note.strip().split("\n", 1)[0]
        shown = {"tags": " ".join(self.tags) or "-", "note": (note[:39] + "…" if len(note) > 40 else note) or "-"}
        best = "-" if self.best_validation_loss is None else f"{self.best_validation_loss:.4f} @{self.best_validation_iteration}"
        return [
            self.run,
            self.name or "-",
            self.state,
            f"{self.iteration}/{self.iterations}" if self.iterations else str(self.iteration),
            best,
            "-" if self.last_train_loss is None else f"{self.last_train_loss:.4f}",
            format_count(self.tokens_per_second),
            format_count(self.trained_tokens) if self.trained_tokens else "0",
            format_duration(self.elapsed_seconds),
            *(shown[label] for label in labels),
            *(format_value(self.config.get(key)) for key in keys),
        ]


HEADER = ("run", "name", "state", "iter", "best val", "last loss", "tok/s", "tokens", "elapsed")
"""The fixed columns of the table, before the differing config keys."""


@dataclass
class Comparison:
    """Runs ranked by best validation loss (runs without one last, in the order given), and the
    config keys whose values differ between them."""

    runs: list[RunSummary]
    keys: list[str]

    @property
    def labels(self) -> tuple[str, ...]:
        """The label columns some run has something for: ``tags``, ``note``."""
        return tuple(name for name, some in (("tags", any(r.tags for r in self.runs)),
                                             ("note", any(r.note.strip() for r in self.runs))) if some)

    def header(self) -> list[str]:
        return [*HEADER, *self.labels, *self.keys]

    def rows(self) -> list[list[str]]:
        return [run.cells(self.keys, self.labels) for run in self.runs]

    def to_json(self) -> dict[str, Any]:
        """For ``tunetop compare --json``: numbers as numbers, ``null`` for unknown."""
        return {
            "differing_keys": self.keys,
            "runs": [
                {
                    "run": r.run,
                    "name": r.name,
                    "state": r.state,
                    "iteration": r.iteration,
                    "iterations": r.iterations,
                    "best_validation_loss": r.best_validation_loss,
                    "best_validation_iteration": r.best_validation_iteration,
                    "last_train_loss": r.last_train_loss,
                    "tokens_per_second": r.tokens_per_second,
                    "trained_tokens": r.trained_tokens,
                    "elapsed_seconds": round(r.elapsed_seconds, 3),
                    "tags": r.tags,
                    "note": r.note,
                    "config": r.config,
                }
                for r in self.runs
            ],
        }

    def text(self) -> str:
        """The table as aligned columns, header first (as ``tunetop ls`` prints)."""
        header = [*(h.upper() for h in (*HEADER, *self.labels)), *self.keys]  # the keys as written in a config, to copy
        lines = [header, *self.rows()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"learning_rate": 1e-4}}`` -> ``{"optimizer.learning_rate": 1e-4}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values are not the same in every config, in the configs' own order.

    A key one config lacks differs. Who a run is (:data:`IGNORED_KEYS`) is left out. One config
    (or none) has nothing to differ from.
    """
    if len(configs) < 2:
        return []
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [
        k for k in keys
        if k.split(".", 1)[0] not in IGNORED_KEYS and any(f.get(k, MISSING) != flat[0].get(k, MISSING) for f in flat[1:])
    ]


def format_value(value: Any) -> str:
    """A config value as the table shows it: TOML's spelling (true, [a, b]), floats short, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass
class Entry:
    """A run to compare: its label (id, or HOST:ID), its folded state, whether its engine runs
    (None: not known), and the clock a live run's training time counts up to (None: its last
    event, as for a run whose clock is another machine's)."""

    label: str
    state: RunState
    alive: bool | None = None
    now: float | None = None


def summarize(entry: Entry) -> RunSummary:
    """One run's row; a run that reads active with no engine is ``dead``, as ``tunetop ls`` says."""
    state = entry.state
    run_state = state.state
    if entry.alive is False and run_state in ACTIVE_STATES:
        run_state = "dead"
    best = state.best_validation
    last = next((x for x in reversed(state.train_losses) if math.isfinite(x)), None)
    speeds = [x for x in state.tokens_per_second_history if x > 0]
    return RunSummary(
        run=entry.label,
        name=state.name,
        state=run_state,
        iteration=state.iteration,
        iterations=state.iterations,
        best_validation_loss=best.loss if best is not None else None,
        best_validation_iteration=best.iteration if best is not None else None,
        last_train_loss=last,
        tokens_per_second=statistics.median(speeds) if speeds else None,
        trained_tokens=state.trained_tokens,
        elapsed_seconds=state.training_time(entry.now if entry.alive else None),
        tags=list(state.tags),
        note=state.note,
    )


def compare(entries: list[Entry]) -> Comparison:
    """The comparison of ``entries``, best validation loss first."""
    keys = differing_keys([entry.state.config for entry in entries])
    runs = []
    for entry in entries:
        summary = summarize(entry)
        flat = flatten(entry.state.config)
        summary.config = {key: flat.get(key) for key in keys}
        runs.append(summary)
    runs.sort(key=lambda r: (r.best_validation_loss is None, r.best_validation_loss or 0.0))  # stable: ties keep their order
    return Comparison(runs, keys)
