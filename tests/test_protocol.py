"""Protocol encoding, command validation and the Clone-pattern sequencer."""

from __future__ import annotations

import gc
import json

import pytest

from engine.protocol import (
    MAX_COMMAND_BYTES,
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
        (b"x" * (MAX_COMMAND_BYTES + 1), "over the"),
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
    return make_event("r", seq, type_, message="") if type_ != "heartbeat" else make_event("r", seq, "heartbeat")


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
