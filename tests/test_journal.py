"""The journal: framed records, torn tails, replay since a seq, tailing a live file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.journal import MAGIC, JournalError, JournalTail, JournalWriter, read_events, read_payloads
from engine.protocol import make_event


def fill(writer: JournalWriter, count: int, run: str = "r") -> None:
    for _ in range(count):
        writer.append(make_event(run, writer.last_seq + 1, "log", message=f"event {writer.last_seq + 1}"))


def test_append_and_replay_since(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "j")
    fill(writer, 3000)
    assert [e["seq"] for e in read_events(writer.path)] == list(range(1, 3001))
    since = list(read_payloads(writer.path, since=2500, start_offset=writer.offset_before(2501)))
    assert [s for s, _ in since] == list(range(2501, 3001))
    assert json.loads(since[0][1])["message"] == "event 2501"


def test_seq_must_be_gap_free(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "j")
    fill(writer, 2)
    with pytest.raises(JournalError, match="gap"):
        writer.append(make_event("r", 5, "log", message="x"))


def test_torn_tail_is_ignored_and_cut_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 10)
    writer.close()
    intact = path.stat().st_size
    with open(path, "ab") as handle:  # a crash mid-append: a header and half a payload
        handle.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x0b\x00\x00\x00\x00\x00\x00\x00{\"seq\":11")
    assert [e["seq"] for e in read_events(path)] == list(range(1, 11))
    reopened = JournalWriter(path)
    assert reopened.last_seq == 10
    assert path.stat().st_size == intact
    fill(reopened, 1)
    assert [e["seq"] for e in read_events(path)][-2:] == [10, 11]


def test_corrupt_record_ends_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 5)
    writer.close()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the last payload: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert [e["seq"] for e in read_events(path)] == [1, 2, 3, 4]


def test_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"hello world")
    with pytest.raises(JournalError, match="not a tunetop journal"):
        list(read_events(path))
    with pytest.raises(JournalError):
        JournalWriter(path)


def test_tail_follows_appends_and_skips_partial_records(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    tail = JournalTail(path)
    assert tail.poll() == []
    fill(writer, 3)
    assert [s for s, _ in tail.poll()] == [1, 2, 3]
    # half-written record: not returned until complete
    with open(path, "ab") as handle:
        handle.write(b"\x05\x00\x00\x00")
    assert tail.poll() == []
    assert path.read_bytes().startswith(MAGIC)
    os.truncate(path, path.stat().st_size - 4)
    fill(writer, 2)
    assert [s for s, _ in tail.poll()] == [4, 5]
