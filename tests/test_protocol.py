"""Protocol encoding, command validation and the Clone-pattern sequencer."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import re
from pathlib import Path

import pytest

from tunetop.control.protocol import (
    EVENT_FIELDS,
    MAX_COMMAND_BYTES,
    MAX_PROMPT_CHARS,
    MAX_SAMPLE_COMMAND_BYTES,
    OPTIONAL_FIELDS,
    PROTOCOL_VERSION,
    Command,
    ProtocolError,
    Reply,
    Sequencer,
    encode,
    loads_many,
    make_event,
    parse_command,
)


def test_event_fields_in_order() -> None:
    event = make_event("run1", 7, "validation", ts=1.5, iteration=10, loss=2.0, seconds=0.3)
    assert list(event) == ["seq", "ts", "run", "type", "iteration", "loss", "seconds"]
    with pytest.raises(ProtocolError):
        make_event("run1", 1, "nonsense")


def test_make_event_holds_producers_to_the_schema() -> None:
    """A field the schema lacks, or one it requires left out, is a producer's bug: refused."""
    with pytest.raises(ProtocolError, match="unknown fields \\['los'\\]"):
        make_event("run1", 1, "validation", iteration=1, los=2.0, loss=2.0, seconds=0.1)
    with pytest.raises(ProtocolError, match="missing fields \\['seconds'\\]"):
        make_event("run1", 1, "validation", iteration=1, loss=2.0)
    assert "iteration" not in make_event("run1", 1, "state", state="starting")  # optional: before the model loads
    for type_, optional in OPTIONAL_FIELDS.items():
        assert set(optional) <= set(EVENT_FIELDS[type_])


def _documented_events() -> dict[str, set[str]]:
    """docs/PROTOCOL.md's events table: each type and the backquoted words of its row."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    table = text[text.index("| `type` | further fields |"):]
    table = table[: table.index("\n\n")]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        types, *rest = row.strip().strip("|").split("|")
        fields = "|".join(rest)
        words = set(re.findall(r"`([a-z_]+)`", fields))
        for type_ in re.findall(r"`([a-z_]+)`", types):
            documented[type_] = words
    return documented


def test_docs_protocol_documents_every_event_type_and_field() -> None:
    """The schema (protocol.EVENT_FIELDS) and docs/PROTOCOL.md name the same types, each with its fields."""
    documented = _documented_events()
    assert set(documented) == set(EVENT_FIELDS)
    for type_, fields in EVENT_FIELDS.items():
        assert set(fields) <= documented[type_], f"docs/PROTOCOL.md's row for {type_!r} lacks {set(fields) - documented[type_]}"


def test_trainer_progress_reports_are_the_protocol_events() -> None:
    """The trainer's progress dataclasses carry exactly their event type's fields."""
    from tunetop.training.trainer import NonFinite, Save, Train, Validation

    for cls in (Train, Validation, Save, NonFinite):
        assert tuple(f.name for f in dataclasses.fields(cls)) == EVENT_FIELDS[cls.event_type], cls


def test_nan_is_encoded_as_null() -> None:
    assert json.loads(encode({"loss": float("nan"), "x": [float("inf")]})) == {"loss": None, "x": [None]}


def test_command_round_trip() -> None:
    command = parse_command(Command("set", {"learning_rate": 1e-4}, id="a1").encode())
    assert (command.cmd, command.args, command.id) == ("set", {"learning_rate": 1e-4}, "a1")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "not a JSON object"),
        (b"[1,2]", "not a JSON object"),
        (json.dumps({"v": 99, "cmd": "pause"}).encode(), "protocol version 99 is not supported"),
        (json.dumps({"v": PROTOCOL_VERSION, "cmd": "explode"}).encode(), "unknown command 'explode'"),
        (json.dumps({"v": PROTOCOL_VERSION, "cmd": "set", "args": [1]}).encode(), "'args' must be a JSON object"),
        (b"x" * (MAX_SAMPLE_COMMAND_BYTES + 1), "over the"),
        (b"\xff\xfe", "not a JSON object"),
    ],
)
def test_malformed_commands_are_explained(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_command(payload)


def test_reply_round_trip() -> None:
    reply = Reply.decode(Reply("x", False, "why", {"a": 1}).encode())
    assert (reply.id, reply.ok, reply.error, reply.result) == ("x", False, "why", {"a": 1})


def ev(seq: int, type_: str = "log") -> dict:
    return make_event("r", seq, type_, message="") if type_ != "heartbeat" else make_event("r", seq, "heartbeat", iteration=0, state="running")


def test_sequencer_orders_and_deduplicates() -> None:
    s = Sequencer()
    assert [e["seq"] for e in s.accept(ev(1))] == [1]
    assert s.accept(ev(1)) == []  # duplicate from an overlapping replay
    assert s.accept(ev(3)) == [] and s.gap  # 2 is missing
    assert [e["seq"] for e in s.accept(ev(2))] == [2, 3]
    assert not s.gap and s.last_seq == 3


def test_heartbeat_ahead_reveals_lost_events() -> None:
    s = Sequencer(last_seq=5)
    s.accept(ev(5, "heartbeat"))
    assert not s.gap
    s.accept(ev(7, "heartbeat"))
    assert s.gap
    s.clear_gap()
    assert [e["seq"] for e in s.accept(ev(6))] == [6]


@pytest.mark.parametrize("enabled", [True, False])
def test_loads_many_decodes_and_leaves_the_collector_as_it_was(enabled: bool) -> None:
    payloads = [encode(make_event("r", seq, "log", message=f"m{seq}")) for seq in range(1, 50)]
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        assert loads_many(payloads) == [json.loads(p) for p in payloads]
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):  # a bad payload: the error comes through, the state is restored
            loads_many([b"{not json"])
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        # json's ValueError and RecursionError escaped parse_command and ended the server thread.
        (b'{"v":1,"cmd":"set","args":{"learning_rate":' + b"1" * 5000 + b"}}", "not a JSON object"),
        (b'{"v":1,"cmd":"set","args":' + b"[" * 3000 + b"]" * 3000 + b"}", "not a JSON object|levels deep"),
        (b'{"v":1,"cmd":"set","args":{"x":' + b"[" * 40 + b"]" * 40 + b"}}", "42 levels deep; at most 32"),
        (b'{"v":' + b"9" * 5000 + b',"cmd":"pause"}', "not a JSON object"),
        (b'{"v":true,"cmd":"pause"}', "protocol version True is not supported"),
        (b'{"v":1,"cmd":"pause","args":{"force":1}}', "unknown argument 'force' for 'pause'; it takes no arguments"),
        (b'{"v":1,"cmd":"sample","args":{"prompt":"x","max_token":3}}', "it takes prompt, max_tokens, temperature, raw"),
        (b'{"v":1,"cmd":"' + b"y" * 5000 + b'"}', r"unknown command 'yyy.*\.\.\.; known"),
    ],
)
def test_hostile_commands_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        parse_command(payload)
    assert len(str(caught.value)) < 600  # the reason, not the frame quoted back


def test_any_bytes_give_a_command_or_a_protocol_error() -> None:
    """Seeded random frames (bytes, JSON fragments, nesting): parse_command raises nothing else."""
    import random

    rng = random.Random(17)
    pieces = [b"{", b"}", b"[", b"]", b"[" * 1500, b"1" * 5000, b'"', b":", b",", b"1" * 30, b"-", b"e999", b"null", b'"v"', b'"cmd"',
              b'"args"', b'"set"', b"\\u0000", b"\xff", b"\x00", b" ", b"1", b"true", b'"\\ud800"']
    for _ in range(5000):
        if rng.random() < 0.3:
            payload = rng.randbytes(rng.randrange(0, 200))
        else:
            payload = b'{"v":1,"x":' + b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 400)))
        with contextlib.suppress(ProtocolError):
            parse_command(payload)


@pytest.mark.parametrize("prompt", ['"' * 60_000, "é" * 60_000, "\x01" * 60_000, "😀" * 65_536], ids=["quotes", "accents", "controls", "emoji"])
def test_a_prompts_limit_counts_its_own_characters_not_json_escapes(prompt: str) -> None:
    # Escaped, these are 2 to 12 bytes a character: a 64 KB frame limit cut them at 5,000 to 32,000.
    frame = Command("sample", {"prompt": prompt, "max_tokens": 4}, id="s").encode()
    assert len(frame) > MAX_COMMAND_BYTES
    assert parse_command(frame).args["prompt"] == prompt


def test_a_prompt_past_its_limit_and_other_large_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match=f"the prompt is {MAX_PROMPT_CHARS + 1:,} characters long; .* at most {MAX_PROMPT_CHARS:,}"):
        parse_command(Command("sample", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, id="s").encode())
    with pytest.raises(ProtocolError, match="over the 65536-byte limit"):  # only a prompt may make a frame larger
        parse_command(Command("pause", {}, id="x" * MAX_COMMAND_BYTES).encode())
    with pytest.raises(ProtocolError, match="over the 65536-byte limit"):
        parse_command(Command("sample", {"prompt": "x"}, id="x" * MAX_COMMAND_BYTES).encode())
