"""A completely full disk: the engine pauses, loses nothing, and goes on when there is room again.

Made real with a small tmpfs (as root) mounted as the state folder and filled with a filler
file while the engine trains; skipped, with the reason, where mounting is not possible.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.events import EventLog
from tunetop.control.journal import HEADER, MAGIC, JournalWriter, read_events, scan
from tunetop.interop.tensorboard import TensorBoardWriter
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import resolve
from tunetop.training.checkpoint import is_complete, latest_checkpoint


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A fresh 16 MB tmpfs, unmounted afterwards (lazily if something still holds it)."""
    folder = Path(tempfile.mkdtemp(prefix="tt-disk-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def fill(disk: Path, name: str = "filler") -> Path:
    """Write a filler file until the disk refuses another byte."""
    filler = disk / name
    block = b"\0" * (64 * 1024)
    with open(filler, "ab", buffering=0) as handle:
        for size in (len(block), 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    if handle.write(block[:size]) != size:
                        break
    with pytest.raises(OSError) as refused:
        (disk / f"{name}.probe").write_bytes(b"x")
    assert refused.value.errno == errno.ENOSPC
    return filler


def assert_intact(journal: Path) -> list[dict[str, Any]]:
    """No torn tail (the last record ends at the end of the file) and seq gap-free from 1."""
    data = journal.read_bytes()
    assert data.startswith(MAGIC)
    records = list(scan(data))
    end = records[-1][0] + HEADER.size + len(records[-1][2]) if records else len(MAGIC)
    assert end == len(data), f"torn tail: {len(data) - end} bytes after the last record"
    assert [seq for _offset, seq, _payload in records] == list(range(1, len(records) + 1))
    return list(read_events(journal))


def tensorboard_steps(folder: Path) -> list[int]:
    """The step of every scalar record in the run's TensorBoard files (after the version header)."""
    steps = []
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            body = data[offset + 12 : offset + 12 + length]
            assert len(body) == length and offset + 16 + length <= len(data), "torn TensorBoard record"
            offset += 16 + length
            if body[9:10] == b"\x10":  # field 2 (step), varint: a scalars record
                value, shift, position = 0, 0, 10
                while True:
                    byte = body[position]
                    value |= (byte & 0x7F) << shift
                    shift, position = shift + 7, position + 1
                    if not byte & 0x80:
                        break
                steps.append(value)
    return steps


def test_the_journal_holds_events_in_memory_while_the_disk_is_full(small_disk: Path) -> None:
    troubles: list[tuple[str, int | None]] = []
    delivered: list[int] = []
    log = EventLog("r", JournalWriter(small_disk / "journal.ttj"))
    log.on_trouble = lambda what, error: troubles.append((what, error.errno))
    log.subscribers.append(lambda event, _payload: delivered.append(event["seq"]))
    log.emit("log", message="before")
    filler = fill(small_disk)
    # The journal's last page still has room for some records; then appends fail.
    for index in range(200):
        log.emit("log", message=f"while full {index} " + "x" * 100)
    assert troubles and troubles[0] == ("journal.ttj", errno.ENOSPC)
    assert log.held > 0
    written = assert_intact(small_disk / "journal.ttj")  # a failed append left no torn record
    assert len(written) == log.last_seq == 201 - log.held
    assert delivered == list(range(1, log.last_seq + 1))  # subscribers see only what is journaled
    assert not log.retry()  # still full: nothing changes
    filler.unlink()
    assert log.retry() and log.held == 0
    log.close()
    events = assert_intact(small_disk / "journal.ttj")
    assert [e["message"] for e in events] == ["before"] + [f"while full {i} " + "x" * 100 for i in range(200)]
    assert delivered == list(range(1, 202))


def test_tensorboard_keeps_records_that_do_not_fit(small_disk: Path) -> None:
    writer = TensorBoardWriter(small_disk / "tb", private=True)
    filler = fill(small_disk)
    failed = 0
    for step in range(1, 301):
        try:
            writer.scalars(step, {"train/loss": 1.0 / step, "train/learning_rate": 1e-4})
        except OSError as error:
            assert error.errno == errno.ENOSPC and error.filename == str(writer.path)
            failed += 1
    assert failed and writer.pending
    assert tensorboard_steps(small_disk / "tb") == list(range(1, 301 - writer.pending))  # whole records only
    filler.unlink()
    writer.flush()
    writer.close()
    assert tensorboard_steps(small_disk / "tb") == list(range(1, 301))
    assert (small_disk / "tb").stat().st_mode & 0o777 == 0o700 and writer.path.stat().st_mode & 0o777 == 0o600


def heartbeat(run: Any) -> dict[str, Any]:
    """The next heartbeat the engine publishes."""
    import zmq

    from tunetop.control.protocol import loads
    from tunetop.runs.client_sync import run_endpoints

    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(run_endpoints(run).events)
    try:
        while socket.poll(10_000):
            event = loads(socket.recv_multipart()[-1])
            if event["type"] == "heartbeat":
                return dict(event)
        raise AssertionError("no heartbeat within 10 s")
    finally:
        socket.close(0)


def _stop(run: Any) -> None:
    pid = run.engine_pid()
    if run.is_alive() and pid:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=10)


def test_a_full_disk_pauses_the_engine_and_it_finishes_when_there_is_room(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNETOP_HOME", str(small_disk / "state"))
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 60, "steps_per_report": 2, "steps_per_eval": 20},
        checkpoints={"save_every": 10},
        metrics={"tensorboard": True},
    )
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        wait_for(lambda: send_command(run, "status").result["iteration"] >= 4, timeout=120)

        # 1. The disk fills while the engine trains: it pauses and says why, the journal intact.
        filler = fill(small_disk)
        paused = wait_for(lambda: (r := send_command(run, "status").result)["state"] == "paused" and r, timeout=60)
        assert "No space left on device" in paused["notice"] and "resumes by itself" in paused["notice"]
        assert run.is_alive()
        assert "No space left on device" in heartbeat(run)["notice"]  # published, as it cannot be journaled
        assert_intact(run.journal)
        # While paused and full, commands still work; their events wait in memory once the
        # journal's last page is used up, and the journal stays intact.
        accepted = 0
        while "wait in memory" not in send_command(run, "status").result.get("notice", ""):
            assert send_command(run, "set", {"steps_per_report": 2}).ok
            accepted += 1
            assert accepted < 500, "the journal never filled up"
        assert_intact(run.journal)
        assert send_command(run, "status").result["iteration"] == paused["iteration"]  # not training
        refused = tunetop("resume", run.id)
        assert refused.returncode == 3 and "cannot resume yet" in refused.stderr and "No space" in refused.stderr

        # 2. Room again: everything held is written and training goes on by itself.
        filler.unlink()
        wait_for(lambda: send_command(run, "status").result["state"] == "running", timeout=60)
        wait_for(lambda: send_command(run, "status").result["iteration"] > paused["iteration"] + 4, timeout=120)

        # 3. Full again, then room and the user's `resume` (the engine may have beaten it to it).
        filler = fill(small_disk)
        wait_for(lambda: send_command(run, "status").result["state"] == "paused", timeout=60)
        filler.unlink()
        resumed = tunetop("resume", run.id)
        assert resumed.returncode == 0, resumed.stderr
        wait_for(lambda: not run.is_alive(), timeout=240)
    finally:
        _stop(run)

    events = assert_intact(run.journal)
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["finished", "log"] or kinds[-1] == "finished"
    finished = next(e for e in events if e["type"] == "finished")
    assert (finished["reason"], finished["iteration"]) == ("completed", 60)
    # Nothing lost: every report, every held event, every save; the trouble said once per episode.
    assert [e["iteration"] for e in events if e["type"] == "train"] == list(range(2, 61, 2))
    assert sum(e["type"] == "config_changed" for e in events) == accepted
    # Each episode: said once when it began (a warning, or the error of a save that did not fit),
    # and once when it ended.
    said = [e for e in events if e["type"] in ("warning", "error") and ("cannot write" in e["message"] or "could not save" in e["message"])]
    recovered = [e for e in events if e["type"] == "log" and "writes succeed again" in e["message"]]
    assert len(recovered) == 2 and 2 <= len(said) <= 4, ([e["message"] for e in said], recovered)
    assert said[0]["seq"] < recovered[0]["seq"] < said[-1]["seq"] < recovered[1]["seq"]
    assert sum(e["type"] == "warning" for e in said) <= 2
    saves = sorted({e["iteration"] for e in events if e["type"] == "save"})
    assert saves == [10, 20, 30, 40, 50, 60]
    latest = latest_checkpoint(run.checkpoints)
    assert latest is not None and latest.name == "0000060" and is_complete(latest)
    steps = tensorboard_steps(run.path / "tensorboard")  # train at every report, validation every 20
    assert sorted(steps) == sorted(list(range(2, 61, 2)) + [20, 40, 60])
    assert run.status()["state"] == "finished"
    assert "Traceback" not in run.log.read_text(errors="replace")
    listed = tunetop("ls", check=True).stdout
    assert run.id in listed and "finished" in listed


def test_a_last_save_that_does_not_fit_waits_for_room_and_is_written(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 24, "steps_per_report": 2, "steps_per_eval": 1000},
        checkpoints={"save_every": 1000},  # the only save is the last one
    )
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    run.checkpoints.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(run.checkpoints)], capture_output=True, text=True)
    if mounted.returncode != 0:
        _stop(run)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        waiting = wait_for(lambda: (r := send_command(run, "status").result).get("notice") and r, timeout=180)
        assert waiting["iteration"] == 24 and waiting["state"] == "paused" and run.is_alive()
        assert "the save of iteration 24" in waiting["notice"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(run.checkpoints)], check=True)  # room again
        wait_for(lambda: not run.is_alive(), timeout=60)
        events = assert_intact(run.journal)
        finished = events[-1] if events[-1]["type"] == "finished" else next(e for e in events if e["type"] == "finished")
        assert (finished["reason"], finished["iteration"]) == ("completed", 24)
        assert [e["iteration"] for e in events if e["type"] == "save"] == [24]
        latest = latest_checkpoint(run.checkpoints)
        assert latest is not None and latest.name == "0000024" and is_complete(latest)
    finally:
        _stop(run)
        subprocess.run(["umount", str(run.checkpoints)], check=False)


def test_a_resume_that_fails_on_a_full_disk_says_its_own_failure(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure of an engine that could write nothing is its own, not the last error its run's
    journal holds from an earlier engine (which `train --resume --detach` used to repeat)."""
    from tunetop.control.protocol import make_event

    monkeypatch.setenv("TUNETOP_HOME", str(small_disk / "state"))
    config = write_config(tmp_path / "run.toml", training={"iterations": 4, "steps_per_report": 2, "steps_per_eval": 100},
                          checkpoints={"save_every": 2})
    tunetop("train", str(config), check=True)
    run = resolve(None)
    writer = JournalWriter(run.journal)  # an earlier engine's error, as a journal keeps it
    writer.append(make_event(run.id, writer.last_seq + 1, "error", message="an earlier engine's error"))
    writer.close()
    filler = fill(small_disk)
    try:
        result = tunetop("train", "--resume", run.id, "--detach", timeout=240)
    finally:
        filler.unlink()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "an earlier engine's error" not in output
    assert "failed to start" in output and "No space left on device" in output, output
    assert "Traceback" not in output
