"""The history digest: what it keeps of a long run, and reading it back from disk."""

from __future__ import annotations

from pathlib import Path

from tunetop.control.events import EventLog
from tunetop.control.history import DIGEST_NAME, History, event_type, read_history
from tunetop.control.journal import JournalWriter
from tunetop.control.protocol import encode, loads, make_event


def train(log: EventLog, i: int) -> None:
    log.emit("train", iteration=i, loss=1.0, learning_rate=1e-4, iterations_per_second=1.0,
             tokens_per_second=1.0, trained_tokens=i, peak_memory=0.1)


def test_event_type_is_read_without_decoding() -> None:
    event = make_event("run-1", 7, "validation", iteration=3, loss=1.5, seconds=0.1)
    assert event_type(encode(event)) == b"validation"
    assert event_type(b'{"no":"type"}') == b""


def test_rare_events_stay_whole_train_events_thin_out_chatty_ones_keep_the_newest(tmp_path: Path) -> None:
    history = History(max_points=100, recent=50)
    log = EventLog("r", JournalWriter(tmp_path / "journal.ttj", history=history))
    log.emit("state", state="running")
    for i in range(1, 10_001):
        train(log, i)
        if i % 500 == 0:
            log.emit("save", iteration=i, path="p", kind="adapter", checkpoint="")
        if i % 2 == 0:
            log.emit("log", message=f"line {i}")
    upto, records = history.records()
    assert upto == log.last_seq
    events = [loads(payload) for _seq, payload in records]
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
    trains = [e["iteration"] for e in events if e["type"] == "train"]
    assert 100 <= len(trains) <= 250 and trains[0] == 1  # at most 2 x max_points spread + the recent
    assert trains[-50:] == list(range(9_951, 10_001))
    spread = [t for t in trains if t < 9_951]
    assert len({b - a for a, b in zip(spread, spread[1:], strict=False)}) == 1  # evenly spread over the run
    assert [e["iteration"] for e in events if e["type"] == "save"] == list(range(500, 10_001, 500))
    logs = [e for e in events if e["type"] == "log"]
    assert len(logs) == 2000 and logs[-1]["message"] == "line 10000"


def test_a_saved_digest_plus_the_journal_tail_equals_a_fresh_read(tmp_path: Path) -> None:
    journal = tmp_path / "journal.ttj"
    log = EventLog("r", JournalWriter(journal, history=History()))
    for i in range(1, 3001):
        train(log, i)
    log.write_digest()
    assert (tmp_path / DIGEST_NAME).exists()
    for i in range(3001, 3101):  # written after the digest, as after an engine crash
        train(log, i)
    log.journal.close()
    upto, records = read_history(journal)
    assert upto == 3100
    iterations = [loads(p)["iteration"] for _s, p in records]
    assert iterations[-100:] == list(range(3001, 3101)) and iterations[0] == 1

    (tmp_path / DIGEST_NAME).write_bytes(b"garbage")  # a damaged digest costs a full read, not an error
    upto2, records2 = read_history(journal)
    assert upto2 == 3100 and [loads(p)["iteration"] for _s, p in records2][-1] == 3100
