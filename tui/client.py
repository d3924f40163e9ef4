"""The asyncio client of a run's control plane, as the ZeroMQ guide's Clone pattern.

Subscribe to live events first, then ask for a replay since the last seq held; apply history
up to the END marker, then live events with seq > END. A first attach asks for the engine's
digest (``history``: rare events whole, train events thinned) before the replay, so a run of a
million events is on screen in well under a second. A gap in seq (or a heartbeat ahead of
what we hold) triggers a bounded re-replay. Silence longer than ``dead_after`` seconds marks the
engine unreachable; the client keeps what it has and reconnects with backoff, asking only for
what it missed. No mlx import here: the TUI runs on machines without MLX.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from tunetop.control.endpoints import Endpoints, SocketError, check_endpoint
from tunetop.control.journal import RecordStream
from tunetop.control.protocol import (
    END_MARKER,
    HISTORY_END_MARKER,
    PROTOCOL_VERSION,
    Command,
    Reply,
    Sequencer,
    loads,
    loads_many,
)

EventHandler = Callable[[list[dict[str, Any]]], None]
StatusHandler = Callable[[str, str], None]
"""Called with (status, detail): connecting, live, replaying, disconnected, incompatible, closed."""


class ClientError(RuntimeError):
    """A command that could not be delivered or answered."""


class RunClient:
    """Keeps a local copy of a run's event history in step with its engine."""

    def __init__(
        self,
        endpoints: Endpoints,
        on_events: EventHandler,
        on_status: StatusHandler | None = None,
        last_seq: int = 0,
        dead_after: float = 6.0,
        max_replays: int = 5,
        digest: bool = True,
        on_heartbeat: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.on_events = on_events
        # Heartbeats are not journaled (on_events gets the journal's events, gap-free); their
        # iteration keeps a screen current between reports.
        self.on_heartbeat = on_heartbeat or (lambda _event: None)
        self.on_status = on_status or (lambda _s, _d: None)
        self.sequencer = Sequencer(last_seq)
        self.dead_after = dead_after
        self.max_replays = max_replays
        self.status = "connecting"
        self._context = zmq.asyncio.Context.instance()
        self._dealer: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._replay_done: asyncio.Future[int] | None = None
        self._closed = False
        self.replays = 0
        self._stream = RecordStream()
        self.digest = digest  # start from the engine's digest when we hold nothing yet
        self._history_done: asyncio.Future[int] | None = None
        self._history_stream = RecordStream()
        self._history_records: list[tuple[int, bytes]] = []

    @property
    def last_seq(self) -> int:
        return self.sequencer.last_seq

    def _set_status(self, status: str, detail: str = "") -> None:
        self.status = status
        self.on_status(status, detail)

    # -- public API ------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay attached until ``close()``; reconnect with backoff when the engine goes quiet."""
        backoff = 0.2
        while not self._closed:
            try:
                await self._session()
                backoff = 0.2
            except _Incompatible as error:
                self._set_status("incompatible", str(error))
                return
            except (zmq.ZMQError, TimeoutError, ClientError) as error:
                self._set_status("disconnected", str(error) or type(error).__name__)
            if self._closed:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        self._set_status("closed")

    async def command(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 15.0) -> Reply:
        """Send a command and wait for its reply."""
        if self._dealer is None:
            raise ClientError("not connected to the engine")
        command_id = uuid.uuid4().hex[:12]
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._dealer.send(Command(cmd, args or {}, id=command_id).encode())
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ClientError(f"no reply to '{cmd}' within {timeout:.0f}s") from None
        finally:
            self._pending.pop(command_id, None)

    def close(self) -> None:
        self._closed = True

    # -- one connection --------------------------------------------------------------------

    async def _session(self) -> None:
        self._set_status("connecting")
        try:  # sockets someone else bound would receive our commands and could pose as the engine
            check_endpoint(self.endpoints.events)
            check_endpoint(self.endpoints.commands)
        except SocketError as error:
            raise ClientError(str(error)) from None
        sub = self._context.socket(zmq.SUB)
        dealer = self._context.socket(zmq.DEALER)
        for socket in (sub, dealer):
            socket.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoints.events)  # subscribe first: nothing published from now on is missed
        dealer.connect(self.endpoints.commands)
        self._dealer = dealer
        reader = asyncio.create_task(self._read_dealer(dealer))
        live: list[dict[str, Any]] = []
        try:
            hello = await self.command("hello", timeout=self.dead_after)
            protocol = hello.result.get("protocol")
            if protocol != PROTOCOL_VERSION:
                raise _Incompatible(
                    f"the engine speaks protocol {protocol}, this client {PROTOCOL_VERSION}: use the same tunetop version on both sides"
                )
            if self.digest and self.last_seq == 0:
                await self._history()
            await self._replay(sub, live)
            self._set_status("live")
            await self._live(sub, dealer, live)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._dealer = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ClientError("connection to the engine lost"))
            sub.close(0)
            dealer.close(0)

    async def _read_dealer(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frames = await dealer.recv_multipart()
            kind = frames[0]
            if kind == b"REP":
                reply = Reply.decode(frames[1])
                future = self._pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)
            elif kind == b"JRNL":
                since = self.sequencer.last_seq
                records = self._stream.feed(frames[1])
                self._apply(loads_many(payload for seq, payload in records if seq > since))
            elif kind == END_MARKER and self._replay_done is not None and not self._replay_done.done():
                self._replay_done.set_result(int(frames[1]))
            elif kind == b"HIST":
                self._history_records.extend(self._history_stream.feed(frames[1]))
            elif kind == HISTORY_END_MARKER and self._history_done is not None and not self._history_done.done():
                self._history_done.set_result(int(frames[1]))

    def _apply(self, events: list[dict[str, Any]]) -> None:
        ready: list[dict[str, Any]] = []
        for event in events:
            ready.extend(self.sequencer.accept(event))
        if ready:
            self.on_events(ready)

    async def _history(self) -> None:
        """Fold the engine's digest and continue from the last seq it covers.

        The digest skips seqs on purpose (thinned train events), so it bypasses the sequencer.
        An engine without one answers with an error, and the full replay that follows covers all.
        """
        assert self._dealer is not None
        self._set_status("replaying", "history digest")
        loop = asyncio.get_running_loop()
        self._history_done = loop.create_future()
        self._history_stream = RecordStream()
        self._history_records = []
        command_id = "history-" + uuid.uuid4().hex[:8]
        refused: asyncio.Future[Reply] = loop.create_future()
        self._pending[command_id] = refused  # only an error comes back as a reply
        try:
            await self._dealer.send(Command("history", {}, id=command_id).encode())
            waiting: set[asyncio.Future[Any]] = {self._history_done, refused}
            done, _ = await asyncio.wait(waiting, timeout=max(self.dead_after, 30.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pending.pop(command_id, None)
        if self._history_done not in done:
            if not done:
                raise TimeoutError("no history digest from the engine")
            return  # refused: an older engine; the replay brings everything
        upto = self._history_done.result()
        events = loads_many(payload for _seq, payload in self._history_records)
        self._history_records = []
        self.sequencer = Sequencer(upto)
        if events:
            self.on_events(events)

    async def _replay(self, sub: zmq.asyncio.Socket, live: list[dict[str, Any]]) -> None:
        """History since last_seq up to END; live events arriving meanwhile are buffered."""
        assert self._dealer is not None
        self._set_status("replaying", f"since {self.last_seq}")
        self.replays += 1
        self.sequencer.clear_gap()
        self._replay_done = asyncio.get_running_loop().create_future()
        self._stream = RecordStream()
        await self._dealer.send(Command("replay", {"since": self.last_seq}, id="replay").encode())
        buffer_task = asyncio.create_task(self._buffer_live(sub, live))
        try:
            await asyncio.wait_for(self._replay_done, timeout=max(self.dead_after, 30.0))
        finally:
            buffer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await buffer_task
        self._apply(live)
        live.clear()

    async def _buffer_live(self, sub: zmq.asyncio.Socket, live: list[dict[str, Any]]) -> None:
        while True:
            frames = await sub.recv_multipart()
            live.append(loads(frames[-1]))

    async def _live(self, sub: zmq.asyncio.Socket, dealer: zmq.asyncio.Socket, live: list[dict[str, Any]]) -> None:
        replays_here = 0
        while not self._closed:
            if not await sub.poll(int(self.dead_after * 1000)):
                raise TimeoutError(f"no heartbeat from the engine for {self.dead_after:.0f}s")
            batch = []
            while True:  # drain what is queued: coalesce bursts into one handler call
                try:
                    frames = await sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                batch.append(loads(frames[-1]))
                if len(batch) >= 5000:
                    break
            self._apply(batch)
            for event in batch:
                if event.get("type") == "heartbeat" and not self.sequencer.gap:  # else it is ahead of the screen
                    self.on_heartbeat(event)
            if self.sequencer.gap:
                replays_here += 1
                if replays_here > self.max_replays:
                    raise ClientError("events keep going missing; reconnecting")
                await self._replay(sub, live)
            else:
                replays_here = 0


class _Incompatible(Exception):
    pass
