"""A small blocking client for scripts and the CLI: send a command, or fetch a run's history.

The TUI uses the asyncio client in ``tui/client.py``; this one serves ``tunetop pause`` and
friends and the process-level tests. No mlx import here.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import zmq

from tunetop.control.endpoints import Endpoints, check_endpoint, endpoints_for
from tunetop.control.journal import RecordStream
from tunetop.control.protocol import END_MARKER, Command, ProtocolError, Reply, decode, loads_many
from tunetop.runs.folders import RunDir


def run_endpoints(run: RunDir) -> Endpoints:
    """A local run's endpoints, as its engine wrote them (or as they would be named)."""
    try:
        data = json.loads(run.endpoints_file.read_text())
        return Endpoints(events=data["events"], commands=data["commands"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return endpoints_for(run.id)


def _dealer(endpoint: str) -> zmq.Socket:
    check_endpoint(endpoint)
    socket: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def request(endpoint: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Reply:
    """Send one command and wait for its reply; TimeoutError names the endpoint."""
    socket = _dealer(endpoint)
    try:
        command = Command(cmd, args or {}, id=uuid.uuid4().hex[:12])
        socket.send(command.encode())
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply to '{cmd}' from {endpoint} within {timeout:.0f}s; is the engine alive?")
        frames = socket.recv_multipart()
        return Reply.decode(frames[-1])
    finally:
        socket.close(0)


def send_command(run: RunDir, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Reply:
    """Send a command to a local run's engine."""
    return request(run_endpoints(run).commands, cmd, args, timeout)


def replay(endpoint: str, since: int = 0, timeout: float = 30.0) -> tuple[list[dict[str, Any]], int]:
    """Every event with seq > ``since`` up to the engine's END marker, and that END seq."""
    socket = _dealer(endpoint)
    events: list[dict[str, Any]] = []
    stream = RecordStream()
    try:
        socket.send(Command("replay", {"since": since}, id="replay").encode())
        while True:
            if not socket.poll(int(timeout * 1000)):
                raise TimeoutError(f"replay from {endpoint} did not finish within {timeout:.0f}s")
            frames = socket.recv_multipart()
            kind = frames[0]
            if kind == b"JRNL":
                events.extend(loads_many(payload for seq, payload in stream.feed(frames[1]) if seq > since))
            elif kind == END_MARKER:
                return events, int(frames[1])
            elif kind == b"REP":
                reply = Reply.decode(frames[1])
                raise ProtocolError(f"replay refused: {reply.error}")
            else:
                decode(frames[-1])
    finally:
        socket.close(0)
