"""The journal: framed records, torn tails, replay since a seq, tailing a live file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.journal import (
    MAGIC,
    Damage,
    JournalError,
    JournalTail,
    JournalWriter,
    read_events,
    read_payloads,
    scan,
)
from engine.journal_index import index_path, open_sealed
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


def test_a_corrupt_last_record_is_a_torn_tail_to_readers(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 5)
    writer.close()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the last payload: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert [e["seq"] for e in read_events(path)] == [1, 2, 3, 4]
    # The writer keeps the bytes beside the journal, and the seal says seq 5 was written:
    # it is not handed out again.
    reopened = JournalWriter(path)
    assert reopened.last_seq == 5 and len(reopened.repairs) == 2
    torn = [p for p in tmp_path.iterdir() if p.name.startswith("j.torn-")]
    cut_at = int(torn[0].name.split("-")[1])  # the journal's own bytes up to the cut, then the cut bytes
    assert len(torn) == 1 and path.read_bytes()[:cut_at] + torn[0].read_bytes() == bytes(data)
    reopened.close()
    lost = list(read_events(path))[-1]
    assert lost["seq"] == 5 and lost["type"] == "warning" and "was lost" in lost["message"]


def test_damage_mid_journal_is_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 10)
    writer.close()
    records = list(scan(path.read_bytes()))
    data = bytearray(path.read_bytes())
    data[records[4][0] + 20] ^= 0x10  # inside record 5
    path.write_bytes(bytes(data))
    damage: list[Damage] = []
    assert [s for s, _ in read_payloads(path, damage=damage)] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert damage == [Damage(records[4][0], records[5][0], 4, 6)]
    assert damage[0].describe().endswith("(records lost: seq 5)")


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


# The fast-read sidecars (engine.journal_index): a dense offsets index and a seal over the
# synced prefix. Every test compares the fast read with the record-by-record walk (`scan`).


def closed_journal(tmp_path: Path, count: int) -> Path:
    """A journal of ``count`` records, closed (so sealed)."""
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, count)
    writer.close()
    return path


def walked(path: Path, since: int = 0) -> list[tuple[int, bytes]]:
    """The reference: every intact record, framing and CRC checked one by one."""
    return [(seq, payload) for _offset, seq, payload in scan(path.read_bytes()) if seq > since]


def test_sealed_journal_reads_through_the_index(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 5000)
    writer.sync()
    fill(writer, 7)  # appended after the last sync: outside the seal, walked record by record
    assert open_sealed(path, len(MAGIC)) is not None
    for since in (0, 1, 2500, 4999, 5000, 5003, 5007):
        assert list(read_payloads(path, since=since)) == walked(path, since)
    offset = writer.offset_before(4000)
    assert list(read_payloads(path, since=3999, start_offset=offset)) == walked(path, 3999)
    writer.close()
    assert list(read_payloads(path)) == walked(path)
    assert [s for s, _ in read_payloads(path)] == list(range(1, 5008))


def test_a_flipped_bit_in_the_sealed_prefix_falls_back_to_the_walk(tmp_path: Path) -> None:
    path = closed_journal(tmp_path, 50)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert open_sealed(path, len(MAGIC)) is None
    got = [s for s, _ in read_payloads(path)]
    assert got == [s for s, _ in walked(path)]
    assert len(got) == 49  # the damaged record is skipped, everything after it read


@pytest.mark.parametrize("damage", ["swap", "short", "garbage", "seal_past_end"])
def test_a_wrong_index_or_seal_is_ignored(tmp_path: Path, damage: str) -> None:
    path = closed_journal(tmp_path, 300)
    index = bytearray(index_path(path).read_bytes())
    if damage == "swap":  # two offsets exchanged: each still a record start, the chain breaks
        index[8 + 8 * 10 : 8 + 8 * 12] = index[8 + 8 * 11 : 8 + 8 * 12] + index[8 + 8 * 10 : 8 + 8 * 11]
        index_path(path).write_bytes(bytes(index))
    elif damage == "short":  # an index behind its seal (torn while being written)
        index_path(path).write_bytes(bytes(index[: 8 + 8 * 100]))
    elif damage == "garbage":
        index_path(path).write_bytes(b"TTJINDX1" + os.urandom(8 * 300))
    else:  # the journal lost its end (cut by hand): the seal now claims more than the file holds
        os.truncate(path, path.stat().st_size - 10)
    assert open_sealed(path, len(MAGIC)) is None
    expected = walked(path)
    assert list(read_payloads(path)) == expected
    assert len(expected) == (299 if damage == "seal_past_end" else 300)


def test_reopen_after_a_torn_tail_rebuilds_the_index(tmp_path: Path) -> None:
    path = tmp_path / "j"
    writer = JournalWriter(path)
    fill(writer, 40)
    writer.sync()
    fill(writer, 3)  # never synced: then the process dies mid-append
    with open(path, "ab") as handle:
        handle.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x2c\x00\x00\x00\x00\x00\x00\x00{\"seq\":44")
    index_path(path).unlink()  # and an engine of an older version left no index at all
    reopened = JournalWriter(path)
    assert reopened.last_seq == 43
    fill(reopened, 10)
    reopened.close()
    assert open_sealed(path, len(MAGIC)) is not None
    assert list(read_payloads(path)) == walked(path)
    assert [s for s, _ in read_payloads(path)] == list(range(1, 54))


def test_reading_a_short_stretch_skips_the_seal(tmp_path: Path) -> None:
    path = closed_journal(tmp_path, 1000)
    near_end = next(offset for offset, seq, _ in scan(path.read_bytes()) if seq == 990)
    assert open_sealed(path, len(MAGIC), near_end) is None  # cheaper to walk 10 records
    assert open_sealed(path, len(MAGIC), len(MAGIC)) is not None
    assert [s for s, _ in read_payloads(path, since=995, start_offset=near_end)] == [996, 997, 998, 999, 1000]
