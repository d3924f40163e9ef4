"""The one contract between the engine and its clients: events, commands, replies.

No mlx import: the TUI imports this on machines without MLX. docs/PROTOCOL.md describes the
same thing for people writing their own clients.

Events are JSON objects with ``seq`` (gap-free from 1 within a run), ``ts`` (Unix seconds),
``run`` (the run id) and ``type``, plus the fields of their type. Commands are JSON objects
``{"v": PROTOCOL_VERSION, "id": ..., "cmd": ..., "args": {...}}``; each gets one reply
``{"v", "id", "ok", "error", "result"}``.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_started": ("config", "model", "trainable_parameters", "total_parameters", "iterations", "name"),
    "train": (
        "iteration",
        "loss",
        "learning_rate",
        "iterations_per_second",
        "tokens_per_second",
        "trained_tokens",
        "peak_memory",
    ),
    "validation": ("iteration", "loss", "seconds"),
    "save": ("iteration", "path", "kind", "checkpoint", "removed"),
    "resumed": ("iteration", "checkpoint", "from_seq"),
    "nonfinite": ("iteration", "loss", "epoch", "batch", "action", "cause", "streak"),
    "world": ("size", "backend"),
    "rank_failed": ("ranks", "iteration", "message"),
    "state": ("state", "iteration"),
    "log": ("message",),
    "warning": ("message", "count", "source"),
    "error": ("message",),
    "heartbeat": ("iteration", "state", "notice"),
    "config_changed": ("changes",),
    "finished": ("reason", "iteration", "best_iteration", "best_loss"),
    "sample": ("iteration", "prompt", "completion", "max_tokens", "temperature", "prompt_format"),
    "system": (
        "cpu_percent",
        "rss",
        "memory_used",
        "memory_total",
        "mlx_active",
        "mlx_cache",
        "mlx_peak",
        "gpu_utilization",
        "gpu_memory_used",
        "gpu_memory_total",
        "gpu_power",
    ),
    "tags": ("tags",),
    "note": ("text",),
}
"""The event schema: each type and the fields it carries beyond seq, ts, run and type.

The one table every producer goes through (:func:`make_event` refuses an unknown type, an
unknown field and a missing one) and docs/PROTOCOL.md's events table documents
(tests/test_protocol.py holds them to each other)."""

OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "state": ("iteration",),  # absent until the model is loaded
    "heartbeat": ("notice",),  # only while writes fail
    "save": ("checkpoint", "removed"),  # not in journals of older versions (the trainer's Save always has them)
    "warning": ("count", "source"),  # only a warning from a library or the data layer (tunetop.training.run_warnings)
    "finished": ("best_iteration", "best_loss"),  # only once a validation has run
    "system": EVENT_FIELDS["system"],  # each only where this machine can read it (tunetop.runs.machine)
}
"""Fields of :data:`EVENT_FIELDS` an event of that type may leave out."""

RUN_STATES = ("starting", "running", "paused", "stopping", "finished", "failed")

COMMANDS = (
    "pause", "resume", "stop", "save", "evaluate", "set", "sample", "replay", "history", "hello", "status", "tag", "note",
)
"""Commands the engine accepts. ``replay``, ``history`` and ``hello`` are answered by the server thread."""

COMMAND_ARGS: dict[str, tuple[str, ...] | None] = {
    "sample": ("prompt", "max_tokens", "temperature", "raw"),
    "replay": ("since",),
    "set": None,  # any key: each is checked against the live fields (config.coerce_live)
    "tag": ("add", "remove"),
    "note": ("text",),
}
"""The argument names each command takes (none when absent); others are refused, not ignored."""

MAX_COMMAND_BYTES = 64 * 1024
"""Larger command frames are refused (a ``sample``'s: see MAX_SAMPLE_COMMAND_BYTES)."""

MAX_PROMPT_CHARS = 64 * 1024
"""A sample's prompt may hold this many characters, counted as typed, not as JSON escapes them."""

MAX_SAMPLE_COMMAND_BYTES = 12 * MAX_PROMPT_CHARS + MAX_COMMAND_BYTES
"""A ``sample``'s frame may be this large: JSON writes a character in up to 12 bytes (a quote in
2, a control character in 6, one past U+FFFF as a \\ud83d\\ude00 pair in 12), so any prompt of
MAX_PROMPT_CHARS fits. Larger frames are refused without being parsed."""

MAX_COMMAND_DEPTH = 32
"""Commands nesting arrays and objects deeper are refused (real ones nest two or three levels)."""

END_MARKER = b"END"
"""Replay frames are [b"JRNL", raw journal records]...; the last is [b"END", last seq as ASCII, command id]."""

HISTORY_END_MARKER = b"HEND"
"""History frames are [b"HIST", framed records]...; the last is [b"HEND", last seq covered, command id]."""


try:  # orjson parses events about 3x faster (a 1M-event replay: 3.6 s instead of 10.9 s here)
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency; stay correct without it
    loads = json.loads


def loads_many(payloads: Iterable[bytes]) -> list[Any]:
    """Decode a batch of events with the cyclic garbage collector paused.

    Each decoded event is a new dict, and a batch of them triggers collections that walk every
    live object again and again: half the time of decoding a million events (docs/PERFORMANCE.md).
    JSON values hold no reference cycles, so nothing is left for the collector to find.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return [loads(payload) for payload in payloads]
    finally:
        if was_enabled:
            gc.enable()


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what was wrong."""


def make_event(run: str, seq: int, type_: str, ts: float | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event dict: seq, ts, run, type, then the type's fields (as :data:`EVENT_FIELDS` has them).

    ProtocolError (a bug in the producer, never a user's doing) for a type or field the schema
    does not have, or a field it requires left out.
    """
    schema = EVENT_FIELDS.get(type_)
    if schema is None:
        raise ProtocolError(f"unknown event type {type_!r}")
    if fields.keys() != set(schema):
        unknown = sorted(fields.keys() - set(schema))
        missing = sorted(set(schema) - fields.keys() - set(OPTIONAL_FIELDS.get(type_, ())))
        if unknown or missing:
            raise ProtocolError(f"a {type_!r} event: unknown fields {unknown}, missing fields {missing} (protocol.EVENT_FIELDS)")
    event: dict[str, Any] = {"seq": seq, "ts": time.time() if ts is None else ts, "run": run, "type": type_}
    event.update(fields)
    return event


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. NaN and infinities become null (JSON has no such numbers)."""
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        return json.dumps(_nan_to_none(message), separators=(",", ":")).encode("utf-8")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def decode(payload: bytes) -> dict[str, Any]:
    """Parse one JSON object; raise :class:`ProtocolError` if it is not one.

    Whatever the bytes hold, the only exception is ProtocolError: json refuses integers of
    more than 4,300 digits with a ValueError and deep nesting with a RecursionError, and
    either, escaping a socket thread, would end it.
    """
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError, MemoryError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"not a JSON object: {_short(str(error) or type(error).__name__)}") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((child, level) for child in item)
    return deepest


@dataclass
class Command:
    """A request to the engine."""

    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return encode({"v": self.v, "id": self.id, "cmd": self.cmd, "args": self.args})


def parse_command(payload: bytes) -> Command:
    """Validate a command frame; errors explain what a well-formed one looks like.

    Any frame at all, of any size or content, gives a Command or a ProtocolError: the server
    thread answers the error and serves the next frame.
    """
    if len(payload) > MAX_SAMPLE_COMMAND_BYTES:
        raise ProtocolError(_over_the_limit(len(payload)))
    try:
        message = _loads_command(payload)
    except ProtocolError:
        raise
    except Exception as error:  # a parser's bug must not end the server thread either
        raise ProtocolError(f"not a JSON object: {type(error).__name__}: {_short(str(error))}") from None
    depth = _depth(message)
    if depth > MAX_COMMAND_DEPTH:
        raise ProtocolError(
            f"command nests arrays and objects {depth} levels deep; at most {MAX_COMMAND_DEPTH} are accepted"
        )
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 equal 1 in Python, not here
        raise ProtocolError(
            f"protocol version {_short(repr(version))} is not supported: this engine speaks version "
            f"{PROTOCOL_VERSION}. Use a tunetop of the same version as the engine."
        )
    cmd = message.get("cmd")
    if cmd not in COMMANDS:
        raise ProtocolError(f"unknown command {_short(repr(cmd))}; known commands: {', '.join(COMMANDS)}")
    if len(payload) > MAX_COMMAND_BYTES and cmd != "sample":
        raise ProtocolError(_over_the_limit(len(payload)))
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be a JSON object")
    allowed = COMMAND_ARGS.get(cmd, ())
    unknown = [] if allowed is None else [name for name in args if name not in allowed]
    if unknown:  # a misspelt argument silently ignored would do something the sender did not ask for
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no arguments"
        raise ProtocolError(f"unknown argument {_short(repr(unknown[0]))} for '{cmd}'; {takes}")
    command_id = message.get("id", "")
    if not isinstance(command_id, str):
        raise ProtocolError("'id' must be a string")
    prompt = args.get("prompt") if cmd == "sample" else None
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"the prompt is {len(prompt):,} characters long; a sample's prompt may hold at most {MAX_PROMPT_CHARS:,}")
    prompt_chars = len(prompt) if isinstance(prompt, str) else 0  # a prompt of another type is refused later, by the engine
    if len(payload) > MAX_COMMAND_BYTES + 12 * prompt_chars:  # the prompt's escapes are its own; nothing else may grow
        raise ProtocolError(_over_the_limit(len(payload)))
    return Command(cmd=cmd, args=args, id=command_id)


def _over_the_limit(size: int) -> str:
    return (f"command of {size} bytes is over the {MAX_COMMAND_BYTES}-byte limit (a sample's frame may add 12 bytes "
            f"per character of its prompt, which may hold {MAX_PROMPT_CHARS:,} characters)")


def _loads_command(payload: bytes) -> dict[str, Any]:
    """One JSON object from a command frame, with the parser's own limits turned into ProtocolError.

    orjson refuses nesting past 1,024 levels and numbers past a double's range by itself;
    json (the fallback) raises ValueError or RecursionError, which decode() turns the same way.
    """
    if loads is json.loads:  # pragma: no cover - orjson is a dependency
        return decode(payload)
    try:
        message = loads(payload)
    except ValueError as error:  # orjson.JSONDecodeError is one
        raise ProtocolError(f"not a JSON object: {_short(str(error))}") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


@dataclass
class Reply:
    """The engine's answer to one command."""

    id: str
    ok: bool
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(
            {"v": PROTOCOL_VERSION, "id": self.id, "ok": self.ok, "error": self.error, "result": self.result}
        )

    @classmethod
    def decode(cls, payload: bytes) -> Reply:
        message = decode(payload)
        return cls(
            id=str(message.get("id", "")),
            ok=bool(message.get("ok")),
            error=str(message.get("error") or ""),
            result=message.get("result") or {},
        )


class Sequencer:
    """Orders a client's events by ``seq``, as the ZeroMQ guide's Clone pattern asks.

    Feed it replayed and live events in any order; ``accept`` returns the events to apply now
    (in order, none twice) and ``gap`` tells when something is missing, so the client asks for
    a replay since ``last_seq``. A heartbeat carries the engine's last seq without being an
    event of its own: one ahead of ``last_seq`` means live events were lost.
    """

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.gap = False
        self._pending: dict[int, dict[str, Any]] = {}

    def accept(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        seq = event.get("seq")
        if not isinstance(seq, int):
            return []
        if event.get("type") == "heartbeat":
            if seq > self.last_seq and not self._pending:
                self.gap = True
            return []
        if seq <= self.last_seq:
            return []  # already applied (replay overlapping live)
        self._pending[seq] = event
        ready: list[dict[str, Any]] = []
        while self.last_seq + 1 in self._pending:
            self.last_seq += 1
            ready.append(self._pending.pop(self.last_seq))
        self.gap = bool(self._pending)
        return ready

    def clear_gap(self) -> None:
        """Forget buffered events past a gap (a replay will bring them again)."""
        self.gap = False
        self._pending.clear()
