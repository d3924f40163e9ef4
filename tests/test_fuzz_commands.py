"""Hostile commands against a real engine process: no frame, flood or sample deafens or stalls it.

The first tests pin one failure each (a frame that ended the server thread, a prompt that held
the loop for minutes, a memory cap MLX could not take); the last feeds the command socket
thousands of seeded random frames and checks, after every batch, that the engine still
answers, still trains and still journals. Counts print with ``-s`` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.control.protocol import (
    COMMAND_ARGS,
    COMMANDS,
    MAX_COMMAND_BYTES,
    ProtocolError,
    Reply,
    parse_command,
)
from tunetop.runs.client_sync import run_endpoints, send_command
from tunetop.runs.folders import RunDir, resolve
from tunetop.training.config import LIVE_FIELDS, ConfigError, coerce_live

TERMINAL = (b"REP", b"END", b"HEND")  # the frame kinds that end the answer to one message


def start_engine(tmp_path: Path, env: dict[str, str] | None = None, **sections: dict) -> RunDir:
    """A detached engine training for a long time, a report every step, no scheduled validation or save."""
    training = {"iterations": 100_000, "steps_per_report": 1, "steps_per_eval": 100_000, **sections.pop("training", {})}
    config = write_config(tmp_path / "run.toml", training=training, checkpoints={"save_every": 100_000}, **sections)
    environment = {**os.environ, **(env or {})}
    return resolve(tunetop("train", str(config), "--detach", check=True, env=environment).stdout.strip())


@pytest.fixture
def engines() -> Iterator[list[RunDir]]:
    """Runs started by a test; any still alive at its end is killed."""
    runs: list[RunDir] = []
    yield runs
    for run in runs:
        pid = run.engine_pid()
        if run.is_alive() and pid:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda run=run: not run.is_alive(), timeout=30)


def iteration(run: RunDir) -> int:
    return int(send_command(run, "status", timeout=60).result["iteration"])


def dealer(run: RunDir) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(run_endpoints(run).commands)
    return socket


def answer(socket: zmq.Socket, timeout: float = 60.0) -> tuple[bytes, list[bytes]]:
    """The next frames the engine sends this socket: (kind, rest)."""
    assert socket.poll(int(timeout * 1000)), f"no answer within {timeout:.0f}s"
    frames = socket.recv_multipart()
    return frames[0], frames[1:]


def reply(socket: zmq.Socket, timeout: float = 60.0) -> Reply:
    kind, rest = answer(socket, timeout)
    assert kind == b"REP", kind
    return Reply.decode(rest[-1])


def heartbeat_after(run: RunDir, since: float, timeout: float = 60.0) -> dict[str, Any]:
    """A heartbeat published after ``since`` (time.time()): the server thread is alive and publishing."""
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(run_endpoints(run).events)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if socket.poll(1000):
                event = json.loads(socket.recv_multipart()[-1])
                if event["type"] == "heartbeat" and event["ts"] > since:
                    return event
        raise AssertionError(f"no heartbeat within {timeout:.0f}s")
    finally:
        socket.close(0)


def journal(run: RunDir) -> list[dict[str, Any]]:
    events = list(read_events(run.journal))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "journal seq numbers have a gap"
    return events


# -- one test per failure that was seen ------------------------------------------------------


def test_frames_that_broke_the_parser_leave_the_engine_serving(tmp_path: Path, engines: list[RunDir]) -> None:
    """A 5,000-digit integer or 3,000 '[' raised in the server thread: sockets gone, training on, deaf."""
    run = start_engine(tmp_path)
    engines.append(run)
    wait_for(lambda: iteration(run) >= 2, timeout=120)
    socket = dealer(run)
    hostile = [
        b'{"v":1,"id":"digits","cmd":"set","args":{"learning_rate":' + b"1" * 5000 + b"}}",
        b'{"v":1,"id":"nest","cmd":"set","args":{"learning_rate":' + b"[" * 3000 + b"]" * 3000 + b"}}",
        b'{"v":1,"id":"deep","cmd":"set","args":{"learning_rate":' + b"[" * 100 + b"]" * 100 + b"}}",
        b'{"v":1,"id":"bool","cmd":"replay","args":{"since":true}}',  # JSON true is not a seq
    ]
    for frame in hostile:
        socket.send(frame)
        refused = reply(socket)
        assert not refused.ok and refused.error, frame[:40]
    socket.close(0)
    sent = time.time()
    assert heartbeat_after(run, sent)["state"] == "running"
    before = iteration(run)
    wait_for(lambda: iteration(run) > before + 2, timeout=120)
    stopped = send_command(run, "stop", timeout=60)
    assert stopped.ok and stopped.result["state"] == "stopping"
    wait_for(lambda: not run.is_alive(), timeout=120)
    events = journal(run)
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "stopped"


def test_a_server_thread_that_dies_anyway_stops_the_run_cleanly(tmp_path: Path, engines: list[RunDir]) -> None:
    """If the socket thread ends for any reason, the run saves and stops instead of training deaf."""
    run = start_engine(tmp_path, env={"TUNETOP_FAULT_SERVER_CRASH": "end-the-server-thread"})
    engines.append(run)
    wait_for(lambda: iteration(run) >= 2, timeout=120)
    socket = dealer(run)
    socket.send(b"end-the-server-thread")
    assert not socket.poll(3000)  # no answer: the thread that would give it has ended
    socket.close(0)
    wait_for(lambda: not run.is_alive(), timeout=120)
    events = journal(run)
    errors = [e["message"] for e in events if e["type"] == "error"]
    assert len(errors) == 1 and "command server stopped" in errors[0] and f"--resume {run.id}" in errors[0]
    assert [e["state"] for e in events if e["type"] == "state"][-1] == "failed"
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "server_failed"
    saves = [e for e in events if e["type"] == "save"]
    assert saves and saves[-1]["iteration"] == events[-1]["iteration"]  # nothing trained is lost
    assert (run.adapters / "adapters.safetensors").exists()


def test_a_memory_cap_mlx_cannot_take_is_refused_with_a_sentence(tmp_path: Path, engines: list[RunDir]) -> None:
    """memory_limit_gb = 1e300 or 1e12 came back as OverflowError / TypeError text, the value stored."""
    run = start_engine(tmp_path)
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    for value in (1e300, 1e12, "1e12"):
        refused = send_command(run, "set", {"memory_limit_gb": value, "steps_per_report": 2}, timeout=60)
        assert not refused.ok
        assert "'training.memory_limit_gb' must be between 0.0 and 1000000.0" in refused.error, refused.error
        assert "Error" not in refused.error  # a sentence, not an exception's name
    accepted = send_command(run, "set", {"memory_limit_gb": 3}, timeout=60)
    assert accepted.ok and accepted.result["changes"] == {"memory_limit_gb": 3.0}
    changes = [e["changes"] for e in journal(run) if e["type"] == "config_changed"]
    assert changes == [{"memory_limit_gb": 3.0}]  # the refused sets stored nothing, not even their other key


def test_a_long_prompt_is_refused_and_training_goes_on(tmp_path: Path, engines: list[RunDir]) -> None:
    """A 60,000-token prompt held the loop for 13+ minutes (and SIGTERM with it)."""
    run = start_engine(tmp_path, data={"mask_prompt": True, "max_seq_length": 512})
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    refused = send_command(run, "sample", {"prompt": "x" * 60_000, "max_tokens": 1}, timeout=120)
    assert not refused.ok
    assert re.search(r"the prompt is 600\d\d tokens long; a sample takes at most 512 \(data.max_seq_length\)", refused.error)
    over = send_command(run, "sample", {"prompt": "x", "max_tokens": 100_000}, timeout=60)
    assert not over.ok and "'sampling.max_tokens' must be between 1 and 4096" in over.error
    before = iteration(run)
    wait_for(lambda: iteration(run) > before + 2, timeout=120)
    fits = send_command(run, "sample", {"prompt": "x" * 450, "max_tokens": 2}, timeout=120)  # with the chat template's tokens
    assert fits.ok, fits.error


def test_pause_and_stop_land_inside_a_sample(tmp_path: Path, engines: list[RunDir]) -> None:
    """pause is answered between two tokens of a sample (it timed out behind one); stop cuts it short."""
    run = start_engine(tmp_path, env={"TUNETOP_FAULT_SLOW_SAMPLE": "1.0"})  # every prefill chunk or token: 1 s
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    socket = dealer(run)
    # 1,800 prompt tokens: 8 prefill chunks of 256, so 8 s at least before the first token.
    socket.send(json.dumps({"v": 1, "id": "s", "cmd": "sample", "args": {"prompt": "x" * 1800, "max_tokens": 64}}).encode())
    socket.send(json.dumps({"v": 1, "id": "p", "cmd": "pause"}).encode())
    paused = reply(socket, timeout=120)
    assert paused.id == "p" and paused.ok, "the pause came after the sample's answer"
    socket.send(json.dumps({"v": 1, "id": "x", "cmd": "stop"}).encode())
    answers = {r.id: r for r in (reply(socket, timeout=120), reply(socket, timeout=120))}
    socket.close(0)
    assert answers["x"].ok
    assert not answers["s"].ok and "cut short: the run is stopping" in answers["s"].error
    wait_for(lambda: not run.is_alive(), timeout=120)
    events = journal(run)
    assert events[-1]["reason"] == "stopped" and not [e for e in events if e["type"] in ("sample", "error")]


def test_sigterm_cuts_a_sample_short(tmp_path: Path, engines: list[RunDir]) -> None:
    """SIGTERM during a sample (ignored for 5 minutes in the report) ends the run at once, saved."""
    run = start_engine(tmp_path, env={"TUNETOP_FAULT_SLOW_SAMPLE": "1.0"})
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    socket = dealer(run)
    socket.send(json.dumps({"v": 1, "id": "s", "cmd": "sample", "args": {"prompt": "x" * 1800, "max_tokens": 64}}).encode())
    socket.send(json.dumps({"v": 1, "id": "p", "cmd": "pause"}).encode())
    assert reply(socket, timeout=120).id == "p"  # answered from inside the sample: the sample runs now
    os.kill(run.engine_pid() or 0, signal.SIGTERM)
    cut = reply(socket, timeout=120)
    socket.close(0)
    assert cut.id == "s" and not cut.ok and "cut short" in cut.error
    wait_for(lambda: not run.is_alive(), timeout=120)
    events = journal(run)
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "terminated"
    assert [e for e in events if e["type"] == "save"][-1]["iteration"] == events[-1]["iteration"]


def test_queued_samples_take_turns_with_training_steps(tmp_path: Path, engines: list[RunDir]) -> None:
    """A burst of samples runs one per step boundary; past the per-client and the overall waiting
    limits they are refused as busy."""
    run = start_engine(tmp_path)
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    sockets = [dealer(run) for _ in range(5)]
    ask = {"prompt": "Where does Ada live?", "max_tokens": 2}
    for n in range(12):  # one client: 8 may wait, the rest are refused at once
        sockets[0].send(json.dumps({"v": 1, "id": f"s{n}", "cmd": "sample", "args": ask}).encode())
    answers = [reply(sockets[0], timeout=300)]
    assert not answers[0].ok and answers[0].error.startswith("busy: this client already has 8"), answers[0]
    for number, socket in enumerate(sockets[1:], start=1):  # four more: past 32 waiting in all
        for n in range(8):
            socket.send(json.dumps({"v": 1, "id": f"s{number * 12 + n}", "cmd": "sample", "args": ask}).encode())
    answers += [reply(sockets[0], timeout=300) for _ in range(11)]
    answers += [reply(socket, timeout=300) for socket in sockets[1:] for _ in range(8)]
    for socket in sockets:
        socket.close(0)
    done = [a for a in answers if a.ok]
    busy = [a for a in answers if not a.ok]
    assert len(done) >= 32 and busy
    # "dropped": a connection's descriptor reused by a new one before the server saw the old one
    # close can take the new client's samples for the gone client's (a known race of fd-keyed
    # monitor events; ZMQ_ROUTER_NOTIFY would key them by peer). Seen once on a fresh machine.
    refusals = ("busy: 32 samples and evaluations", "busy: this client already has 8", "dropped: the client that asked")
    assert all(a.error.startswith(refusals) for a in busy), [a.error for a in busy]
    assert {a.error[:12] for a in busy} == {"busy: 32 sam", "busy: this c"}, "one of the two limits never applied"
    iterations = [a.result["iteration"] for a in sorted(done, key=lambda a: int(a.id[1:]))]
    assert len(iterations) == len(set(iterations)), "two samples ran at one step boundary"


@pytest.mark.skip(reason="dropping a gone client's samples is off: connections keyed by descriptor took live "
                  "clients for gone ones (engine/control/server.py says so); the waiting limits bound it")
def test_a_disconnected_clients_waiting_samples_are_dropped(tmp_path: Path, engines: list[RunDir]) -> None:
    """Samples a client left waiting when it went away do not run (32 of them held training to a
    step a minute); the journal says how many were dropped."""
    run = start_engine(tmp_path, env={"TUNETOP_FAULT_SLOW_SAMPLE": "0.5"})  # each token half a second
    engines.append(run)
    wait_for(lambda: iteration(run) >= 1, timeout=120)
    socket = dealer(run)
    for n in range(8):
        ask = {"prompt": "Where does Ada live?", "max_tokens": 8}
        socket.send(json.dumps({"v": 1, "id": f"s{n}", "cmd": "sample", "args": ask}).encode())
    # A quick command, answered between two tokens of the first sample: the loop has taken all 8.
    socket.send(json.dumps({"v": 1, "id": "r", "cmd": "set", "args": {"steps_per_report": 1}}).encode())
    assert reply(socket, timeout=120).id == "r"
    socket.close(0)
    wait_for(lambda: any(e["type"] == "log" and "for a client that disconnected" in e["message"] for e in journal(run)), timeout=120)
    (note,) = [e["message"] for e in journal(run) if e["type"] == "log" and "disconnected" in e["message"]]
    dropped = int(re.search(r"dropped (\d+) samples?", note).group(1))  # type: ignore[union-attr]
    assert dropped >= 6, note  # at most the running sample and one more got their turn
    after = iteration(run)
    wait_for(lambda: iteration(run) >= after + 5, timeout=120)
    assert len([e for e in journal(run) if e["type"] == "sample"]) == 8 - dropped


# -- the fuzzer ------------------------------------------------------------------------------

SEED = int(os.environ.get("TUNETOP_FUZZ_SEED", "17"))
BATCHES = 10
PER_BATCH = 300

UNKNOWN_ARGS = ("bogus", "", "Prompt", "since", "prompt", "learning_rate", "args", "v", "x" * 300)


class Fuzzer:
    """Seeded structured-random command frames, and what the engine must do with each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sent = 0
        # Every command with every argument it takes and every bad value; and with arguments it
        # does not take (refused by name, whatever the value: three values each).
        values = len(self.bad_values())
        takes = {cmd: (COMMAND_ARGS.get(cmd) or ()) + (tuple(LIVE_FIELDS) if cmd == "set" else ()) for cmd in COMMANDS}
        self.systematic = [(cmd, name, bad) for cmd in COMMANDS for name in takes[cmd] for bad in range(values)]
        self.systematic += [
            (cmd, name, bad) for cmd in COMMANDS for name in UNKNOWN_ARGS for bad in self.rng.sample(range(values), 3)
        ]
        self.triples = len(self.systematic)
        self.rng.shuffle(self.systematic)

    # values -------------------------------------------------------------------------------

    def bad_values(self) -> list[Any]:
        """Values of the wrong type or out of range for every argument of every command."""
        r = self.rng
        return [
            None, True, False, -1, 0, -0.0, 1.5, -1e308, 1e308, 2**63, -(2**63), 10**30,
            "", " ", "nan", "inf", "-1", "1e999", "1" * 5000, "[" * 500, "\x00", "\ud800", "é" * 1000,
            [], [1, 2], {}, {"a": {"b": None}}, [[[[[[]]]]]], list(range(2000)), {str(i): i for i in range(500)},
            "x" * r.randrange(1, 60_000), r.random() * 10 ** r.randrange(-300, 300),
        ]

    def deep(self, levels: int) -> Any:
        value: Any = 0
        for _ in range(min(levels, 900)):  # json.dumps recurses; deeper nesting is written as text below
            value = [value] if self.rng.random() < 0.5 else {"k": value}
        return value

    # frames -------------------------------------------------------------------------------

    def frames(self) -> tuple[str, list[bytes]]:
        """One message (a list of frames) and its kind."""
        r = self.rng
        kind = r.choices(
            ["systematic", "wrong_types", "huge", "deep", "unknown", "garbage", "multipart", "oversize", "valid"],
            weights=[30, 12, 8, 8, 6, 14, 8, 3, 11],
        )[0]
        if kind == "systematic" and not self.systematic:
            kind = "wrong_types"
        if kind == "systematic":
            cmd, name, bad = self.systematic.pop()
            return kind, [self.encode({"v": 1, "id": self.id(), "cmd": cmd, "args": {name: self.bad_values()[bad]}})]
        if kind == "wrong_types":
            message: dict[str, Any] = {"v": 1, "id": self.id(), "cmd": r.choice(COMMANDS), "args": {}}
            field = r.choice(["v", "cmd", "args", "id"])
            message[field] = r.choice(self.bad_values()[:16] + [1.0, "1", [1], {"v": 1}, "pause"])
            if r.random() < 0.2:
                del message[r.choice(list(message))]
            return kind, [self.encode(message)]
        if kind == "huge":
            value = r.choice([10 ** r.randrange(19, 4000), "y" * r.randrange(10_000, 64_000), list(range(r.randrange(1000, 9000))),
                              {f"k{i}": i for i in range(r.randrange(100, 4000))}, 1e308, -1e308, 5e-324])
            where = r.choice(["arg", "id", "cmd", "v", "extra"])
            message = {"v": 1, "id": self.id(), "cmd": r.choice(COMMANDS), "args": {"x": 1}}
            if where == "arg":
                message["args"] = {r.choice(list(LIVE_FIELDS) + ["prompt", "since"]): value}
            else:
                message[where] = value
            return kind, [self.encode(message)]
        if kind == "deep":
            levels = r.choice([33, 100, 1000, 1025, 5000, 30_000])
            if levels <= 900 and r.random() < 0.5:
                return kind, [self.encode({"v": 1, "id": self.id(), "cmd": "set", "args": {"learning_rate": self.deep(levels)}})]
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
            inner = opener * levels + b"1" + closer * levels
            if r.random() < 0.3:
                inner = opener * levels  # never closed
            return kind, [b'{"v":1,"id":"' + self.id().encode() + b'","cmd":"set","args":{"learning_rate":' + inner + b"}}"]
        if kind == "unknown":
            cmd = r.choice(["PAUSE", " pause", "pause ", "", "launch", "stop\x00", "séance", "x" * 5000, "__init__", "hello!"])
            return kind, [self.encode({"v": 1, "id": self.id(), "cmd": cmd, "args": {}})]
        if kind == "garbage":
            valid = json.dumps({"v": 1, "id": self.id(), "cmd": "status"}).encode()
            choice = r.randrange(7)
            if choice == 0:
                payload = r.randbytes(r.randrange(0, 3000))
            elif choice == 1:
                payload = valid[: r.randrange(0, len(valid))]  # truncated
            elif choice == 2:
                payload = valid + r.randbytes(r.randrange(1, 50))  # trailing bytes
            elif choice == 3:
                payload = valid.decode().encode(r.choice(["utf-16", "utf-32", "utf-8-sig"]))
            elif choice == 4:
                payload = b'{"v":1,"cmd":"sta\xfftus"}'
            elif choice == 5:
                payload = b'{"v":1,"cmd":"status","id":"\\ud800\\udfff\\ud800"}'
            else:
                payload = b"\x00" * r.randrange(1, 500)
            return kind, [payload]
        if kind == "multipart":
            valid = json.dumps({"v": 1, "id": self.id(), "cmd": r.choice(["pause", "stop", "status"])}).encode()
            shape = r.randrange(5)
            if shape == 0:
                return kind, [valid, b"extra"]
            if shape == 1:
                return kind, [b"", b""]
            if shape == 2:
                return kind, [valid] * r.randrange(2, 6)
            if shape == 3:
                return kind, [b""]
            return kind, [r.randbytes(r.randrange(0, 100)) for _ in range(r.randrange(2, 8))]
        if kind == "oversize":
            return kind, [b'{"v":1,"cmd":"status","pad":"' + b"z" * r.randrange(MAX_COMMAND_BYTES, 300_000) + b'"}']
        # valid: what a real client sends, answered without changing the run
        cmd, args = r.choice([
            ("status", {}), ("hello", {}), ("resume", {}), ("history", {}),
            ("replay", {"since": r.randrange(0, 5000)}), ("replay", {"since": 2**62}),
            ("sample", {"prompt": "Where does Ada live?", "max_tokens": r.randrange(1, 8)}),
            ("evaluate", {}),
        ])
        return kind, [self.encode({"v": 1, "id": self.id(), "cmd": cmd, "args": args})]

    def id(self) -> str:
        self.sent += 1
        return f"f{self.sent}"

    def encode(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message, allow_nan=False).encode("utf-8", "surrogatepass")

    def harmless(self, frames: list[bytes]) -> bool:
        """False for a message that would legitimately pause, stop or retune the run (the fuzzer skips it)."""
        if len(frames) != 1:
            return True
        try:
            command = parse_command(frames[0])
        except ProtocolError:
            return True
        if command.cmd in ("pause", "stop", "save"):
            return False
        if command.cmd == "set" and command.args:
            try:
                for key, value in command.args.items():
                    coerce_live(key, value)
            except ConfigError:
                return True
            return False
        return True


def test_fuzzed_frames_never_deafen_stall_or_silence_the_engine(tmp_path: Path, engines: list[RunDir]) -> None:
    run = start_engine(tmp_path, training={"validation_batches": 1})
    engines.append(run)
    wait_for(lambda: iteration(run) >= 2, timeout=120)
    fuzzer = Fuzzer(SEED)
    socket = dealer(run)
    answers: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    last_seq = journal(run)[-1]["seq"]
    for batch in range(BATCHES):
        started_at, start_iteration = time.time(), iteration(run)
        expected = 0
        for _ in range(PER_BATCH):
            kind, frames = fuzzer.frames()
            while not fuzzer.harmless(frames):
                skipped[kind] += 1
                kind, frames = fuzzer.frames()
            socket.send_multipart(frames)
            kinds[kind] += 1
            expected += 1
        received = 0
        while received < expected:  # every message gets exactly one answer (samples wait for their step)
            kind_frame, rest = answer(socket, timeout=300)
            if kind_frame not in TERMINAL:
                continue  # JRNL / HIST chunks of a replay or history
            received += 1
            if kind_frame == b"REP":
                response = Reply.decode(rest[-1])
                answers["ok" if response.ok else "busy" if response.error.startswith("busy") else "refused"] += 1
                assert response.ok or response.error, "a refusal without a reason"
                assert len(response.error) < 1000
            else:
                answers["replay/history"] += 1
        # A peer that sends a frame over ZeroMQ's 1 MB limit is dropped; nobody else notices.
        big = dealer(run)
        big.send(b"{" + b" " * (2 << 20) + b"}")
        big.close(0)
        # Still answers, still trains, still journals, still publishes.
        status = send_command(run, "status", timeout=60)
        assert status.ok and status.result["state"] == "running", status
        wait_for(lambda start_iteration=start_iteration: iteration(run) > start_iteration, timeout=300)
        assert heartbeat_after(run, started_at)["state"] == "running"
        events = journal(run)
        assert events[-1]["seq"] > last_seq, f"batch {batch}: the journal did not advance"
        last_seq = events[-1]["seq"]
    socket.close(0)
    events = journal(run)
    assert not [e for e in events if e["type"] == "error"]  # no command raised inside the engine
    log = run.log.read_text(errors="replace")
    assert "server thread" not in log, log[-2000:]
    total = sum(answers.values())
    assert not fuzzer.systematic, "some (command, argument, bad value) triples were never sent"
    print(
        f"\nfuzzed commands (seed {SEED}): {total} messages in {BATCHES} batches, every one answered "
        f"({answers['refused']} refused with a reason, {answers['ok']} accepted, {answers['busy']} busy, "
        f"{answers['replay/history']} replays and histories); all {fuzzer.triples} (command, argument, bad value) "
        f"triples made, {kinds['systematic']} sent and {skipped['systematic']} skipped as valid settings; "
        f"{sum(skipped.values())} messages in all skipped as a real pause/stop/save/set; {BATCHES} peers with "
        "2 MB frames dropped; sent by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + f"; training went from iteration 2 to {iteration(run)}, the journal gap-free to seq {last_seq}"
    )
