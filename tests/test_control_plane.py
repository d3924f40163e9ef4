"""The control plane with real processes and real sockets: a detached engine, clients that
attach, detach, misbehave, and steer it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import zmq

from tests.conftest import tunetop, wait_for
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import replay, run_endpoints, send_command
from tunetop.runs.folders import RunDir
from tunetop.training.embedded import embedded_model_path
from tunetop.tui.client import RunClient


def iteration(run: RunDir) -> int:
    return int(send_command(run, "status").result["iteration"])


def assert_gap_free(events: list[dict[str, Any]], start: int = 1) -> None:
    assert [e["seq"] for e in events] == list(range(start, start + len(events)))


def test_attach_mid_run_sees_the_whole_history_then_live(engine_run: RunDir) -> None:
    wait_for(lambda: iteration(engine_run) >= 10)
    received: list[dict[str, Any]] = []

    async def attach() -> RunClient:
        client = RunClient(run_endpoints(engine_run), received.extend, digest=False)  # every event, not the digest
        task = asyncio.create_task(client.run())
        while client.status != "live":
            await asyncio.sleep(0.05)
        start = len(received)
        while len(received) < start + 5:  # some live events after the history
            await asyncio.sleep(0.05)
        client.close()
        await asyncio.wait_for(task, 10)
        return client

    client = asyncio.run(attach())
    assert_gap_free(received)
    assert received[0]["type"] == "state" and received[0]["state"] == "starting"
    assert any(e["type"] == "run_started" for e in received)
    # One replay on attach; on a busy machine a live gap (a slow subscriber) or a missed heartbeat
    # adds a bounded re-replay, by design. Either way the history is whole and in order (below).
    assert 1 <= client.replays <= 3
    journal = [e["seq"] for e in read_events(engine_run.journal)]
    assert journal[: len(received)] == [e["seq"] for e in received]


def test_detach_and_reattach_fifty_times(engine_run: RunDir) -> None:
    wait_for(lambda: iteration(engine_run) >= 2)
    start = iteration(engine_run)
    endpoint = run_endpoints(engine_run).commands
    ends = []
    for _ in range(50):
        events, end = replay(endpoint, since=0)
        assert_gap_free(events)
        assert events[-1]["seq"] == end
        ends.append(end)
        time.sleep(0.02)
    assert ends == sorted(ends)
    # It kept training meanwhile (on a busy machine fifty replays can fit between two reports).
    wait_for(lambda: replay(endpoint, since=0)[1] > ends[0])
    wait_for(lambda: iteration(engine_run) > start)


def test_clients_killed_mid_replay_cost_nothing(engine_run: RunDir) -> None:
    wait_for(lambda: iteration(engine_run) >= 4)
    context = zmq.Context.instance()
    endpoint = run_endpoints(engine_run).commands
    for _ in range(20):
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        socket.send(b'{"v":1,"id":"r","cmd":"replay","args":{"since":0}}')
        socket.close(0)  # gone before the replay is read
    before = iteration(engine_run)
    wait_for(lambda: iteration(engine_run) > before + 4)
    events, end = replay(endpoint)
    assert_gap_free(events)


def test_ten_thousand_malformed_frames(engine_run: RunDir) -> None:
    wait_for(lambda: iteration(engine_run) >= 2)
    before = iteration(engine_run)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(run_endpoints(engine_run).commands)
    garbage = [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b'{"v":1,"cmd":"launch_missiles"}',
        b'{"v":999,"cmd":"pause"}',
        b'{"v":1,"cmd":"set","args":"x"}',
        b'{"v":1,"cmd":"replay","args":{"since":-5}}',
        b"x" * 70_000,
    ]
    for i in range(10_000):
        frame = garbage[i % len(garbage)]
        if i % 7 == 0:
            socket.send_multipart([frame, b"extra frame"])
        else:
            socket.send(frame)
    replies = 0
    while socket.poll(2000):
        socket.recv_multipart()
        replies += 1
    socket.close(0)
    assert replies > 9000  # every frame is answered (oversized ones may just be dropped)
    assert engine_run.is_alive()
    wait_for(lambda: iteration(engine_run) > before + 4)
    events = list(read_events(engine_run.journal))
    assert_gap_free(events)
    assert all(e["type"] != "error" for e in events)


def test_second_engine_on_the_same_run_is_refused(engine_run: RunDir) -> None:
    result = tunetop("_engine", str(engine_run.path), timeout=60)
    assert result.returncode == 2
    assert "already has a live engine" in result.stderr
    assert "Traceback" not in result.stderr
    assert engine_run.is_alive() and iteration(engine_run) >= 0


def test_pause_holds_the_iteration_and_resume_moves_it_on(engine_run: RunDir) -> None:
    wait_for(lambda: iteration(engine_run) >= 2)
    reply = send_command(engine_run, "pause")
    assert reply.ok and reply.result["state"] == "paused"
    held = iteration(engine_run)
    time.sleep(2.5)
    assert iteration(engine_run) == held
    # heartbeats go on while paused
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(run_endpoints(engine_run).events)
    assert socket.poll(5000)
    import json

    beat = json.loads(socket.recv_multipart()[-1])
    socket.close(0)
    assert beat["type"] == "heartbeat" and beat["state"] == "paused"
    assert send_command(engine_run, "resume").ok
    wait_for(lambda: iteration(engine_run) > held + 2)


def test_set_save_evaluate_and_stop(engine_run: RunDir) -> None:
    from mlx_lm import load

    wait_for(lambda: iteration(engine_run) >= 2)
    reply = send_command(engine_run, "set", {"learning_rate": "1e-4", "steps_per_report": 3, "memory_limit_gb": 4})
    assert reply.ok, reply.error
    refused = send_command(engine_run, "set", {"batch_size": 2})
    assert not refused.ok and "Live-editable fields" in refused.error
    assert send_command(engine_run, "save").ok
    evaluated = send_command(engine_run, "evaluate")
    assert evaluated.ok and evaluated.result["loss"] > 0

    def reported_since_the_change() -> bool:  # else a fast stop can come before the next report
        events = list(read_events(engine_run.journal))
        changed = next((e["seq"] for e in events if e["type"] == "config_changed"), None)
        return changed is not None and any(e["type"] == "train" and e["seq"] > changed for e in events)

    wait_for(reported_since_the_change, timeout=60)
    assert send_command(engine_run, "stop").ok
    wait_for(lambda: not engine_run.is_alive(), timeout=60)
    events = list(read_events(engine_run.journal))
    assert_gap_free(events)
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "stopped"
    changed = [e for e in events if e["type"] == "config_changed"]
    assert changed[0]["changes"] == {"learning_rate": 1e-4, "steps_per_report": 3, "memory_limit_gb": 4.0}
    later_train = [e for e in events if e["type"] == "train" and e["seq"] > changed[0]["seq"]]
    assert later_train and all(e["learning_rate"] == 1e-4 for e in later_train)  # the double that was set, through JSON
    model, _ = load(str(embedded_model_path()), adapter_path=str(engine_run.adapters))  # the built version, whichever it is
    assert model is not None


def test_first_attach_folds_the_digest_then_goes_on_gap_free(tmp_path: Path) -> None:
    """A long run's history arrives thinned (rare events whole), then replay and live events from its end.

    The journal and server are real; the engine behind them is a stand-in that only emits events
    (training 30,000 steps for real would take minutes here).
    """
    from tunetop.control.events import EventLog
    from tunetop.control.history import History
    from tunetop.control.journal import JournalWriter
    from tunetop.control.server import Server
    from tunetop.runs.folders import RunDir

    run = RunDir(tmp_path / "long-run")
    run.path.mkdir()
    log = EventLog(run.id, JournalWriter(run.journal, history=History(max_points=500, recent=100)))
    log.emit("state", state="running")
    for i in range(1, 30_001):
        log.emit("train", iteration=i, loss=3.0 - i / 30_000, learning_rate=1e-4, iterations_per_second=10.0,
                 tokens_per_second=1000.0, trained_tokens=i, peak_memory=0.1)
        if i % 1000 == 0:
            log.emit("validation", iteration=i, loss=2.5 - i / 30_000, seconds=0.1)

    class StandIn:
        run_dir = run
        state = "running"
        trainer = None
        events = log

        def status_result(self) -> dict[str, Any]:
            return {}

    server = Server(StandIn())  # type: ignore[arg-type]
    server.start()
    received: list[dict[str, Any]] = []

    async def attach() -> RunClient:
        client = RunClient(server.endpoints, received.extend)
        task = asyncio.create_task(client.run())
        while client.status != "live":
            await asyncio.sleep(0.02)
        log.emit("validation", iteration=30_000, loss=1.0, seconds=0.1)  # live, after the digest
        while client.last_seq < log.last_seq:
            await asyncio.sleep(0.02)
        client.close()
        await asyncio.wait_for(task, 10)
        return client

    try:
        client = asyncio.run(attach())
    finally:
        server.close()
    seqs = [e["seq"] for e in received]
    assert seqs == sorted(set(seqs))  # in order, none twice
    assert len(received) < 2_000  # not 30,031 events
    assert [e["iteration"] for e in received if e["type"] == "validation"] == [*range(1000, 30_001, 1000), 30_000]
    trains = [e["iteration"] for e in received if e["type"] == "train"]
    assert trains[0] == 1 and trains[-1] == 30_000  # the whole run, thinned
    assert trains[-100:] == list(range(29_901, 30_001))  # the newest steps whole
    assert received[-1]["loss"] == 1.0 and client.last_seq == log.last_seq
