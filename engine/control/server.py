"""The engine's ZeroMQ side: PUB for live events, ROUTER for commands and replay.

One thread owns both sockets (ZeroMQ sockets are not thread-safe). The training loop never
touches them: it puts events and replies on a queue and picks commands off another, between
steps. PUB drops live events for a slow subscriber instead of blocking; a client that lost
some notices the gap in ``seq`` and asks for a replay, served from the journal.

Frames on the ROUTER, client to engine: ``[command JSON]``. Engine to client: ``[b"REP",
reply JSON]`` for commands; for ``replay``: ``[b"JRNL", raw journal records]``... then
``[b"END", last seq, command id]``. PUB frames: ``[b"evt", event JSON]`` (heartbeats included).

A monitor on each ROUTER says when a connection closes; the clients that sent commands on it
are then told to the engine, which drops the samples they left waiting (nobody would read them).

Longer than most modules because one thread owns the sockets: everything it does (publish, answer,
replay, watch connections) runs in its loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from tunetop.control.endpoints import Endpoints, SocketError, endpoints_for
from tunetop.control.journal import frame, read_range
from tunetop.control.protocol import (
    END_MARKER,
    HISTORY_END_MARKER,
    PROTOCOL_VERSION,
    Command,
    ProtocolError,
    Reply,
    encode,
    make_event,
    parse_command,
)
from tunetop.control.security import CurveServer
from tunetop.private import write_private

if TYPE_CHECKING:
    from tunetop.runs.engine import Engine

HEARTBEAT_SECONDS = 2.0
REPLAY_FRAME_BYTES = 1 << 20
PUB_HIGH_WATER = 10_000
ROUTER_HIGH_WATER = 100_000
MAX_ERRORS_IN_A_ROW = 50
"""Loop iterations failing one after another before the socket thread gives up (and the engine stops)."""
FAULT_ENV = "TUNETOP_FAULT_SERVER_CRASH"
"""Fault injection for tests: a command frame equal to this variable's value ends the socket thread."""


class InjectedFault(BaseException):
    """Raised by the fault-injection hook: a BaseException, so no per-message guard catches it."""


class Server:
    """Serves one engine's events and commands until ``close()``."""

    def __init__(self, engine: Engine, endpoints: Endpoints | None = None, tcp: CurveServer | None = None) -> None:
        self.engine = engine
        self.endpoints = endpoints or endpoints_for(engine.run_dir.id)
        self.tcp = tcp
        self._authenticator: Any = None
        self.outbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.malformed = 0
        self.failures = 0
        self._clients: dict[int, set[bytes]] = {}
        """Per connection (its file descriptor): the routing ids that sent the engine commands on it."""
        self.died: BaseException | None = None
        """Set when the socket thread ended by an error: nobody can reach the engine any more."""
        fault = os.environ.get(FAULT_ENV)
        self._fault = fault.encode() if fault else None
        self._thread = threading.Thread(target=self._serve, name="tunetop-server", daemon=True)
        # The socket thread sleeps in poll until a socket or this pipe is ready: waking it on a
        # timer (every 20 ms) cost ~9% of training speed on a 2-core machine (docs/PERFORMANCE.md).
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
            os.write(self._wake_write, b"!")

    # Called from the training thread -------------------------------------------------

    def publish(self, _event: dict[str, Any], payload: bytes) -> None:
        """EventLog subscriber: hand an already-journaled event to the socket thread."""
        self.outbox.put(("evt", payload))
        self._wake()

    def start(self) -> None:
        """Bind the sockets; SocketError says why they could not be."""
        self._thread.start()
        self._ready.wait(10)
        if isinstance(self._error, SocketError):
            raise self._error
        if isinstance(self._error, (OSError, zmq.ZMQError)):
            address = ", ".join(
                [self.endpoints.events, self.endpoints.commands] + ([self.tcp.events, self.tcp.commands] if self.tcp else [])
            )
            raise SocketError(f"the engine cannot open its sockets ({address}): {self._error}") from self._error
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(5)
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    # The socket thread ---------------------------------------------------------------

    def _bind_pair(
        self, context: zmq.Context, events: str, commands: str, curve: CurveServer | None = None
    ) -> tuple[zmq.Socket, zmq.Socket]:
        pub = context.socket(zmq.PUB)
        router = context.socket(zmq.ROUTER)
        if curve is not None:  # before bind: CURVE applies to connections made after it is set
            for socket in (pub, router):
                socket.curve_secretkey = curve.secret_key
                socket.curve_publickey = curve.public_key
                socket.curve_server = True
        pub.setsockopt(zmq.SNDHWM, PUB_HIGH_WATER)
        pub.setsockopt(zmq.LINGER, 1000)  # let the last events (finished) reach subscribers
        pub.bind(events)
        router.setsockopt(zmq.SNDHWM, ROUTER_HIGH_WATER)
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # oversized frames drop the peer, not us
        router.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        router.bind(commands)
        return pub, router

    def _bind(self, context: zmq.Context) -> list[tuple[zmq.Socket, zmq.Socket]]:
        for path in self.endpoints.paths:
            # The run lock is held, so a socket file here is a dead engine's leftover.
            path.unlink(missing_ok=True)
        pairs = [self._bind_pair(context, self.endpoints.events, self.endpoints.commands)]
        for path in self.endpoints.paths:
            path.chmod(0o600)
        if self.tcp is not None:
            self._authenticator = self.tcp.start_authenticator(context)
            pairs.append(self._bind_pair(context, self.tcp.events, self.tcp.commands, self.tcp))
        return pairs

    def _serve(self) -> None:
        context: zmq.Context = zmq.Context.instance()
        try:
            pairs = self._bind(context)
        except BaseException as error:  # report bind failures to start()
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        pubs = [pub for pub, _ in pairs]
        routers = [router for _, router in pairs]
        monitors = [router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED) for router in routers]
        poller = zmq.Poller()
        for router in routers:
            poller.register(router, zmq.POLLIN)
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        last_heartbeat = 0.0
        errors_in_a_row = 0
        try:
            while not self._stop.is_set():
                try:
                    until_heartbeat = max(0.0, last_heartbeat + HEARTBEAT_SECONDS - time.monotonic())
                    ready = [socket for socket, _ in poller.poll(int(until_heartbeat * 1000) + 1)]
                    if self._wake_read in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                    # Connections first: a closed connection's descriptor may be reused by the next
                    # one, whose commands must not be counted as the closed one's. libzmq says a
                    # connection ended before it closes its descriptor, and that one began before
                    # its first command can arrive, so in this order each command finds its own.
                    for monitor in monitors:
                        self._drain_monitor(monitor)
                    for router in routers:
                        if router in ready:
                            self._drain_router(router)
                    self._drain_outbox(pubs)
                    now = time.monotonic()
                    if now - last_heartbeat >= HEARTBEAT_SECONDS:
                        last_heartbeat = now
                        self._heartbeat(pubs)
                    errors_in_a_row = 0
                except Exception as error:  # a bug outside any one message: log it, serve on, unless it persists
                    errors_in_a_row += 1
                    if errors_in_a_row == 1:
                        print("tunetop: the server thread met an error; it goes on serving:", file=sys.stderr)
                        traceback.print_exception(error, file=sys.stderr)
                        sys.stderr.flush()
                    if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                        raise
                    time.sleep(0.05)
            self._drain_outbox(pubs)
        except BaseException as error:
            self.died = error
            print(f"tunetop: the server thread ended: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            # Nobody can pause, stop or watch the run now: the engine saves and stops rather than train deaf.
            self.engine.server_died(f"{type(error).__name__}: {error}")
        finally:
            for pub in pubs:
                pub.close(1000)
            for router, monitor in zip(routers, monitors, strict=True):
                with contextlib.suppress(zmq.ZMQError):
                    router.disable_monitor()
                monitor.close(0)
                router.close(0)
            if self._authenticator is not None:
                self._authenticator.stop()
            for path in self.endpoints.paths:
                path.unlink(missing_ok=True)

    def _heartbeat(self, pubs: list[zmq.Socket]) -> None:
        engine = self.engine
        last_seq = engine.events.last_seq if engine.events else 0
        iteration = engine.trainer.iteration if engine.trainer is not None else 0
        # While writes fail (a full disk) the heartbeat carries the notice the journal cannot hold yet.
        text = getattr(engine, "notice", "")  # stand-in engines (tests, tools) may have none
        notice: dict[str, Any] = {"notice": text} if text else {}
        event = make_event(engine.run_dir.id, last_seq, "heartbeat", iteration=iteration, state=engine.state, **notice)
        payload = encode(event)
        for pub in pubs:
            pub.send_multipart([b"evt", payload], zmq.NOBLOCK)

    def _drain_outbox(self, pubs: list[zmq.Socket]) -> None:
        while True:
            try:
                kind, item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "evt":
                for pub in pubs:
                    with contextlib.suppress(zmq.Again):  # PUB never blocks; clients replay what they miss
                        pub.send_multipart([b"evt", item], zmq.NOBLOCK)
            else:
                router, identity, reply = item
                try:
                    payload = reply.encode()
                except Exception as error:  # a result JSON cannot hold: the client still gets an answer
                    payload = Reply(reply.id, False, f"the reply could not be encoded: {type(error).__name__}: {error}"[:500]).encode()
                self._send(router, identity, [b"REP", payload])

    def _send(self, router: zmq.Socket, identity: bytes, frames: list[bytes]) -> bool:
        try:
            router.send_multipart([identity, *frames], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError):
            return False  # the peer is gone or hopelessly behind; it will ask again

    def _drain_monitor(self, monitor: zmq.Socket) -> None:
        """Connections that closed: the engine drops what their clients left waiting."""
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            clients = self._clients.pop(int(event["value"]), set())
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue  # accepted: a new connection on this descriptor, none of its clients known yet
            for client in clients:
                gone = getattr(self.engine, "client_gone", None)  # stand-in engines (tests, tools) may have none
                if gone is not None:
                    gone(client)

    def _drain_router(self, router: zmq.Socket) -> None:
        for _ in range(1000):  # bounded, so a flood cannot starve live publishing
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                fd = int(parts[0].get(zmq.SRCFD))  # the connection, as the monitor names it
            except (zmq.ZMQError, TypeError, ValueError):
                fd = -1
            frames = [part.bytes for part in parts]
            identity, body = frames[0], frames[1:]
            if self._fault is not None and body == [self._fault]:
                raise InjectedFault(f"{FAULT_ENV} frame received")
            if len(body) != 1:
                self._malformed(identity, router, "a command is exactly one frame of JSON", "")
                continue
            try:
                command = parse_command(body[0])
            except ProtocolError as error:
                self._malformed(identity, router, str(error), _peek_id(body[0]))
                continue
            try:
                self._handle(identity, router, command, fd)
            except Exception as error:  # one message must never end the thread that serves them all
                self._failed(identity, router, command, error)

    def _malformed(self, identity: bytes, router: zmq.Socket, why: str, command_id: str) -> None:
        self.malformed += 1
        if self.malformed == 1 or self.malformed % 1000 == 0:
            print(f"tunetop: refused malformed command ({self.malformed} so far): {why}", file=sys.stderr, flush=True)
        self._send(router, identity, [b"REP", Reply(command_id, False, why).encode()])

    def _failed(self, identity: bytes, router: zmq.Socket, command: Command, error: Exception) -> None:
        """A command that raised while being served (a bug): answer it, log it once, serve on."""
        self.failures += 1
        if self.failures == 1:  # the traceback once; the first tells what the bug is
            print(f"tunetop: command {command.cmd!r} failed in the server thread; it goes on serving:", file=sys.stderr)
            traceback.print_exception(error, file=sys.stderr)
            sys.stderr.flush()
        why = f"the engine could not serve '{command.cmd}': {type(error).__name__}: {error}"[:500]
        self._send(router, identity, [b"REP", Reply(command.id, False, why).encode()])

    def _handle(self, identity: bytes, router: zmq.Socket, command: Command, fd: int = -1) -> None:
        engine = self.engine
        if command.cmd == "hello":
            result = {
                "protocol": PROTOCOL_VERSION,
                "run": engine.run_dir.id,
                "last_seq": engine.events.last_seq if engine.events else 0,
                "state": engine.state,
            }
            self._send(router, identity, [b"REP", Reply(command.id, True, result=result).encode()])
        elif command.cmd == "replay":
            self._replay(identity, router, command)
        elif command.cmd == "history":
            self._history(identity, router, command)
        elif command.cmd == "status":
            self._send(router, identity, [b"REP", Reply(command.id, True, result=engine.status_result()).encode()])
        else:
            def respond(reply: Reply, identity: bytes = identity, router: zmq.Socket = router) -> None:
                self.outbox.put(("rep", (router, identity, reply)))
                self._wake()

            # Not recorded per connection (self._clients stays empty, so no client is ever taken
            # for gone): the monitor names connections by descriptor, and a descriptor reused by a
            # new connection before the old one's close was seen dropped a live client's samples
            # (seen in fresh-machine runs). Until connections are keyed by peer (ZMQ_ROUTER_NOTIFY),
            # the per-connection and overall limits on waiting samples are what bound a gone client.
            engine.submit(command, respond, identity)

    def _replay(self, identity: bytes, router: zmq.Socket, command: Command) -> None:
        """Send the journal's raw records after ``since`` up to now, then END with the last seq.

        Raw byte ranges, not decoded events: the journal's framing is the wire format, so a
        replay of a million events is a file read here and never blocks this thread for long.
        Records from the sparse index point before ``since`` come along; the client skips them.
        """
        since = command.args.get("since", 0)
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:  # JSON true is no seq
            self._send(router, identity, [b"REP", Reply(command.id, False, "'since' must be a whole number >= 0").encode()])
            return
        events = self.engine.events
        assert events is not None
        last, end = events.snapshot()  # events appended during the replay arrive live, with seq > END
        start = events.journal.offset_before(since + 1) if since < last else end
        for data in read_range(events.journal.path, start, end, REPLAY_FRAME_BYTES):
            if not self._send(router, identity, [b"JRNL", data]):
                return
        self._send(router, identity, [END_MARKER, str(last).encode(), command.id.encode()])


    def _history(self, identity: bytes, router: zmq.Socket, command: Command) -> None:
        """Send the run's digest (tunetop.control.history) as journal records, then HEND with the last seq it covers.

        The client folds it and replays from that seq: a few thousand events instead of millions.
        """
        events = self.engine.events
        history = events.journal.history if events is not None else None
        if history is None:
            self._send(router, identity, [b"REP", Reply(command.id, False, "this engine keeps no history digest").encode()])
            return
        upto, records = history.records()
        data = b"".join(frame(seq, payload) for seq, payload in records)
        for start in range(0, len(data), REPLAY_FRAME_BYTES):
            if not self._send(router, identity, [b"HIST", data[start : start + REPLAY_FRAME_BYTES]]):
                return
        self._send(router, identity, [HISTORY_END_MARKER, str(upto).encode(), command.id.encode()])


def _peek_id(body: bytes) -> str:
    try:
        value = json.loads(body).get("id", "")
        return value if isinstance(value, str) else ""
    except Exception:
        return ""


def attach_server(engine: Engine, tcp: CurveServer | None = None) -> Server:
    """Start a server for ``engine`` (an ``Engine.on_ready`` hook) and subscribe it to the events."""
    server = Server(engine, tcp=tcp)
    server.start()
    assert engine.events is not None
    engine.events.subscribers.append(server.publish)
    engine.on_close.append(lambda _engine: server.close())
    write_private(
        engine.run_dir.endpoints_file,
        json.dumps(
            {
                "events": server.endpoints.events,
                "commands": server.endpoints.commands,
                "protocol": PROTOCOL_VERSION,
                **({"tcp_events": tcp.events, "tcp_commands": tcp.commands, "server_key": tcp.public_key.decode()} if tcp else {}),
            }
        ).encode(),
    )
    return server
