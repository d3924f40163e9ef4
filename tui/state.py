"""RunState: everything the screen shows, as a pure fold of the run's events.

No I/O, no Textual: ``apply(event)`` updates the state, and the widgets read it. Tested without
a terminal (tests/test_state.py). Series keep every point; charts downsample when they draw.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunetop.training.config import LIVE_FIELDS

SYSTEM_SERIES = ("cpu_percent", "rss", "memory_used", "mlx_active", "gpu_utilization", "gpu_memory_used", "gpu_power")
"""The ``system`` readings kept over time (the machine panel's sparklines); the rest only as of now."""

ACTIVE_STATES = frozenset({"starting", "running", "paused", "stopping"})
ENDED_STATES = frozenset({"finished", "failed"})
"""States a `finished` event always follows at once: the log shows that event's line, not theirs."""

RATE_SECONDS = 120.0
"""The ETA's speed is iterations over wall-clock time, with older intervals weighted down by
e^(-age / RATE_SECONDS): steady over a run's ups and downs, yet it follows a real change of speed
within a few minutes. One report's own it/s swung the ETA from 3m44s to 13m35s on a shared machine."""


@dataclass
class ValidationRow:
    iteration: int
    loss: float
    seconds: float
    change: float | None  # vs. the previous validation; None for the first


@dataclass
class CheckpointRow:
    """A save whose checkpoint still exists (``save`` events add rows; their ``removed`` field takes
    away the ones that retention deleted)."""

    iteration: int
    path: str
    kind: str
    ts: float
    validation_loss: float | None  # measured at this very iteration; None when no validation ran there
    checkpoint: str = ""  # the full-state checkpoint folder


@dataclass
class LogLine:
    ts: float
    level: str  # log, warning, error
    message: str


@dataclass
class RunState:
    """The client's view of one run, rebuilt from events alone."""

    run_id: str = ""
    name: str = ""
    model: str = ""
    state: str = "unknown"
    iterations: int = 0
    iteration: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    started_ts: float | None = None
    last_ts: float | None = None
    finished_reason: str = ""
    learning_rate: float | None = None
    iterations_per_second: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int = 0
    peak_memory: float | None = None
    train_iterations: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    train_tokens: list[int] = field(default_factory=list)  # trained tokens at each train point (x by tokens)
    tokens_per_second_history: list[float] = field(default_factory=list)
    validations: list[ValidationRow] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    logs: deque[LogLine] = field(default_factory=lambda: deque(maxlen=2000))
    log_total: int = 0  # lines ever logged; the deque keeps only the last 2000
    samples: list[tuple[int, str, str, bool]] = field(default_factory=list)  # (iteration, prompt, completion, raw)
    last_seq: int = 0
    events_applied: int = 0
    world_size: int = 1  # ranks of a data-parallel run
    tags: list[str] = field(default_factory=list)  # the config's, until the first ``tags`` event
    note: str = ""
    _tagged: bool = False  # a ``tags`` event was seen: later run_started configs (resumes) no longer set the tags
    system: dict[str, float] = field(default_factory=dict)  # the newest reading of each `system` field
    system_series: dict[str, list[float]] = field(default_factory=dict)  # SYSTEM_SERIES over time
    system_events: int = 0
    running_seconds: float = 0.0  # time spent in the running state, up to running_since
    running_since: float | None = None  # when the current running stretch began; None when not running
    _previous_ts: float | None = None  # the ts of the event before the one being applied
    _rate_point: tuple[float, int] | None = None  # (ts, iteration) of the last report of this running stretch
    _rate_iterations: float = 0.0  # decayed sums behind ``rate``
    _rate_seconds: float = 0.0

    # -- folding -------------------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event in. Unknown types are ignored (newer engines may send more)."""
        kind = event.get("type")
        ts = event.get("ts")
        if isinstance(event.get("seq"), int) and kind != "heartbeat":
            self.last_seq = max(self.last_seq, event["seq"])
            self.events_applied += 1
        if isinstance(ts, (int, float)) and kind != "heartbeat":
            self._previous_ts = self.last_ts
            self.last_ts = float(ts)
            if self.started_ts is None:
                self.started_ts = float(ts)
        self.run_id = self.run_id or str(event.get("run", ""))
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(event)

    def apply_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.apply(event)

    def _on_run_started(self, e: dict[str, Any]) -> None:
        self.name = str(e.get("name") or self.name)
        self.model = str(e.get("model", ""))
        self.iterations = int(e.get("iterations") or 0)
        self.trainable_parameters = int(e.get("trainable_parameters") or 0)
        self.total_parameters = int(e.get("total_parameters") or 0)
        self.config = e.get("config") or {}
        if not self._tagged:
            tags = self.config.get("tags") if isinstance(self.config, dict) else None
            self.tags = [str(t) for t in tags] if isinstance(tags, list) else []
        self._note(e, f"run started: {self.model}, {self.trainable_parameters:,} trainable parameters")

    def _on_tags(self, e: dict[str, Any]) -> None:
        self.tags = [str(t) for t in e.get("tags") or []]
        self._tagged = True
        self._note(e, f"tags: {', '.join(self.tags) or '(none)'}")

    def _on_note(self, e: dict[str, Any]) -> None:
        self.note = str(e.get("text") or "")
        self._note(e, f"note: {self.note}" if self.note else "note cleared")

    def _on_world(self, e: dict[str, Any]) -> None:
        self.world_size = int(e.get("size") or 1)
        self._note(e, f"{self.world_size} ranks joined ({e.get('backend', '')}); rank 0 reports for all")

    def _on_train(self, e: dict[str, Any]) -> None:
        self.iteration = int(e["iteration"])
        self._measure_rate(e)
        loss = e.get("loss")
        self.train_iterations.append(self.iteration)
        self.train_losses.append(float(loss) if loss is not None else math.nan)
        self.train_tokens.append(int(e.get("trained_tokens") or 0))
        self.learning_rate = e.get("learning_rate")
        self.iterations_per_second = e.get("iterations_per_second")
        self.tokens_per_second = e.get("tokens_per_second")
        self.tokens_per_second_history.append(float(e.get("tokens_per_second") or 0.0))
        self.trained_tokens = int(e.get("trained_tokens") or 0)
        self.peak_memory = e.get("peak_memory")

    def _on_validation(self, e: dict[str, Any]) -> None:
        loss = float(e["loss"]) if e.get("loss") is not None else math.nan
        previous = self.validations[-1].loss if self.validations else None
        change = loss - previous if previous is not None else None
        iteration = int(e["iteration"])
        self.iteration = iteration
        self.validations.append(ValidationRow(iteration, loss, float(e.get("seconds") or 0.0), change))
        for saved in self.checkpoints:  # `save` then `evaluate` at one iteration: the same weights
            if saved.iteration == iteration:
                saved.validation_loss = loss

    def _on_save(self, e: dict[str, Any]) -> None:
        iteration = int(e["iteration"])
        self.iteration = iteration
        # A validation loss belongs to the weights it measured: only one at this very iteration.
        validation = next((v.loss for v in reversed(self.validations) if v.iteration == iteration), None)
        removed = set(e.get("removed") or ()) | {iteration}  # a second save at one iteration replaces the first
        self.checkpoints = [c for c in self.checkpoints if c.iteration not in removed]
        self.checkpoints.append(
            CheckpointRow(iteration, str(e.get("path", "")), str(e.get("kind", "adapter")), float(e.get("ts") or 0),
                          validation, str(e.get("checkpoint") or ""))
        )
        self.checkpoints.sort(key=lambda c: c.iteration)  # a resume from an earlier checkpoint saves below later ones
        where = e.get("checkpoint") or e.get("path", "")
        self._note(e, f"saved {e.get('kind', 'adapter')} at iteration {iteration}: {where}")
        if e.get("removed"):
            gone = sorted(e["removed"])
            what = f"checkpoint of iteration {gone[0]}" if len(gone) == 1 else \
                f"checkpoints of iterations {', '.join(str(i) for i in gone)}"
            self._note(e, f"checkpoints.keep_last removed the {what}")

    def _note(self, e: dict[str, Any], message: str, level: str = "log") -> None:
        self.logs.append(LogLine(float(e.get("ts") or 0), level, message))
        self.log_total += 1

    def _on_state(self, e: dict[str, Any]) -> None:
        new = str(e.get("state", self.state))
        ts = float(e.get("ts") or 0)
        if self.running_since is not None and new != "running":
            # "starting" comes from a new engine: the last one died while running, at its last event.
            end = self._previous_ts if new == "starting" and self._previous_ts is not None else ts
            self.running_seconds += max(end - self.running_since, 0.0)
            self.running_since = None
        elif new == "running" and self.running_since is None:
            self.running_since = ts
        self._rate_point = None  # a pause, or the engine's start, is no training speed
        if isinstance(e.get("iteration"), int):
            self.iteration = e["iteration"]
        self.state = new
        if new in ENDED_STATES:
            return  # the `finished` event right after says it, with the reason: one line, not two
        at = f" at iteration {e['iteration']:,}" if isinstance(e.get("iteration"), int) and new != "starting" else ""
        self._note(e, f"state: {self.state}{at}")

    def _on_finished(self, e: dict[str, Any]) -> None:
        if self.running_since is not None:
            self.running_seconds += max(float(e.get("ts") or 0) - self.running_since, 0.0)
            self.running_since = None
        if isinstance(e.get("iteration"), int):
            self.iteration = e["iteration"]
        self.finished_reason = str(e.get("reason", ""))
        best = f", best at iteration {e['best_iteration']}" if e.get("best_iteration") is not None else ""
        self._note(e, f"finished ({self.finished_reason}) at iteration {e.get('iteration', self.iteration)}{best}")
        if self.state in ACTIVE_STATES or self.state == "unknown":
            self.state = "failed" if self.finished_reason in ("failed", "bad_input", "rank_failed") else "finished"

    def _on_log(self, e: dict[str, Any]) -> None:
        self._note(e, str(e.get("message", "")))

    def _on_warning(self, e: dict[str, Any]) -> None:
        self._note(e, str(e.get("message", "")), "warning")

    def _on_error(self, e: dict[str, Any]) -> None:
        self._note(e, str(e.get("message", "")), "error")

    def _on_config_changed(self, e: dict[str, Any]) -> None:
        changes = e.get("changes") or {}
        self._note(e, "changed: " + ", ".join(f"{k} = {v}" for k, v in changes.items()))
        if "learning_rate" in changes:
            self.learning_rate = changes["learning_rate"]
        for key, value in changes.items():  # so the set form shows what the run now uses
            if key in LIVE_FIELDS:
                section, name = LIVE_FIELDS[key]
                self.config.setdefault(section, {})[name] = value

    def _on_resumed(self, e: dict[str, Any]) -> None:
        """A resume from a checkpoint: what came after that checkpoint is no longer the run's history."""
        iteration = int(e.get("iteration") or 0)
        keep = next((i for i, x in enumerate(self.train_iterations) if x > iteration), len(self.train_iterations))
        del self.train_iterations[keep:], self.train_losses[keep:], self.tokens_per_second_history[keep:]
        del self.train_tokens[keep:]
        self.validations = [v for v in self.validations if v.iteration <= iteration]
        self.iteration = iteration
        self.finished_reason = ""
        self._note(e, f"resumed at iteration {iteration} from {e.get('checkpoint', '')}")

    def _on_sample(self, e: dict[str, Any]) -> None:
        raw = e.get("prompt_format") == "raw"
        self.samples.append((int(e.get("iteration") or 0), str(e.get("prompt", "")), str(e.get("completion", "")), raw))
        how = " (raw)" if raw else ""
        self._note(e, f"sample @ {e.get('iteration')}{how}: {e.get('prompt', '')!r} -> {e.get('completion', '')!r}")

    def _on_nonfinite(self, e: dict[str, Any]) -> None:
        pass  # the warning event that follows carries the message

    def _on_system(self, e: dict[str, Any]) -> None:
        """The machine: a field this engine could not read stays absent (not zero)."""
        self.system_events += 1
        self.system = {
            key: float(value) for key, value in e.items()
            if key not in ("seq", "ts", "run", "type") and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for key in SYSTEM_SERIES:
            if key in self.system:
                self.system_series.setdefault(key, []).append(self.system[key])

    def _on_heartbeat(self, e: dict[str, Any]) -> None:
        if isinstance(e.get("iteration"), int):  # the engine's iteration now, between reports
            self.iteration = e["iteration"]

    def _measure_rate(self, e: dict[str, Any]) -> None:
        """Fold one report into the wall-clock speed the ETA uses (see RATE_SECONDS)."""
        ts, iteration = float(e.get("ts") or 0), int(e["iteration"])
        point = self._rate_point
        self._rate_point = (ts, iteration) if self.state == "running" else None
        if point is None or ts <= point[0] or iteration <= point[1]:
            return
        seconds = ts - point[0]
        decay = math.exp(-seconds / RATE_SECONDS)
        self._rate_iterations = self._rate_iterations * decay + (iteration - point[1])
        self._rate_seconds = self._rate_seconds * decay + seconds

    # -- derived values ------------------------------------------------------------------

    @property
    def memory_cap(self) -> float | None:
        """``training.memory_limit_gb`` when the run sets one (it may change live), else None."""
        cap = self.config.get("training", {}).get("memory_limit_gb")
        return float(cap) if isinstance(cap, (int, float)) and cap > 0 else None

    @property
    def progress(self) -> float:
        """Fraction of iterations done, 0..1."""
        return min(self.iteration / self.iterations, 1.0) if self.iterations else 0.0

    def training_time(self, now: float | None) -> float:
        """Seconds spent training (in the running state): pauses, loading and gaps between engines
        do not count. ``now`` is the clock for a stretch still running; None (a run read from its
        journal, whose engine is gone) ends that stretch at the last event."""
        seconds = self.running_seconds
        if self.running_since is not None:
            end = now if now is not None else (self.last_ts or self.running_since)
            seconds += max(end - self.running_since, 0.0)
        return seconds

    @property
    def rate(self) -> float | None:
        """Iterations per second of wall-clock training (validation and saves included), smoothed."""
        return self._rate_iterations / self._rate_seconds if self._rate_seconds > 0 else None

    def eta(self) -> float | None:
        """Seconds left at the smoothed speed, or None when unknown or not training."""
        speed = self.rate or self.iterations_per_second  # the first report's own speed, until there are two
        if self.state != "running" or not speed or not self.iterations:
            return None
        return max(self.iterations - self.iteration, 0) / speed

    @property
    def best_validation(self) -> ValidationRow | None:
        finite = [v for v in self.validations if math.isfinite(v.loss)]
        return min(finite, key=lambda v: v.loss) if finite else None


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: exponential moving average with debiasing; weight 0 = raw."""
    if weight <= 0:
        return list(values)
    out: list[float] = []
    last = 0.0
    count = 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        count += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count))
    return out


def downsample(xs: Sequence[float], ys: list[float], buckets: int) -> tuple[list[float], list[float]]:
    """At most ``buckets`` points: the mean of each bucket of consecutive points."""
    n = len(xs)
    if n <= buckets or buckets <= 0:
        return [float(x) for x in xs], list(ys)
    out_x: list[float] = []
    out_y: list[float] = []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if hi <= lo:
            continue
        finite = [y for y in ys[lo:hi] if math.isfinite(y)]
        out_x.append(sum(xs[lo:hi]) / (hi - lo))
        out_y.append(sum(finite) / len(finite) if finite else math.nan)
    return out_x, out_y


def format_duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 12s; '-' for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_count(value: float | None) -> str:
    """12.3k, 4.5M; '-' for unknown."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"
