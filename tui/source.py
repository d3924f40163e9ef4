"""Where a dashboard's events come from: a live engine (ZeroMQ) or a finished run's journal.

Both feed the same callbacks, so the screen does not care which one it has. No mlx here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.client_sync import run_endpoints
from engine.history import read_history
from engine.protocol import Reply, loads
from engine.runs import RunDir
from tui.client import ClientError, RunClient

EventsCallback = Callable[[list[dict[str, Any]]], None]
StatusCallback = Callable[[str, str], None]


class EventSource:
    """The interface both sources share."""

    read_only = True

    async def run(self) -> None:
        raise NotImplementedError

    async def command(self, cmd: str, args: dict[str, Any] | None = None) -> Reply:
        return Reply("", False, "this run is not live: opened read-only from its journal")

    def close(self) -> None:
        pass


class JournalSource(EventSource):
    """Reads a run's journal once (a finished run, or one whose engine died)."""

    def __init__(self, journal: Path, on_events: EventsCallback, on_status: StatusCallback) -> None:
        self.journal = journal
        self.on_events = on_events
        self.on_status = on_status

    async def run(self) -> None:
        # The digest (engine.history): every rare event, train events thinned; nothing else decoded.
        _upto, records = await asyncio.to_thread(read_history, self.journal)
        batch = [loads(payload) for _seq, payload in records]
        if batch:
            self.on_events(batch)
        self.on_status("read-only", "")


class CommandSource(EventSource):
    """Events as JSON lines from a command (a finished remote run: ``ssh host tunetop events RUN``)."""

    def __init__(self, command: list[str], on_events: EventsCallback, on_status: StatusCallback) -> None:
        self.argv = command
        self.on_events = on_events
        self.on_status = on_status

    async def run(self) -> None:
        process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        assert process.stdout is not None
        batch: list[dict[str, Any]] = []
        async for line in process.stdout:
            if line.strip():
                batch.append(loads(line))
            if len(batch) >= 20_000:
                self.on_events(batch)
                batch = []
        if batch:
            self.on_events(batch)
        await process.wait()
        self.on_status("read-only", "")


class LiveSource(EventSource):
    """Attached to a live engine through :class:`tui.client.RunClient`."""

    read_only = False

    def __init__(self, client: RunClient) -> None:
        self.client = client

    @classmethod
    def for_run(
        cls,
        run: RunDir,
        on_events: EventsCallback,
        on_status: StatusCallback,
        on_heartbeat: Callable[[dict[str, Any]], None] | None = None,
    ) -> LiveSource:
        return cls(RunClient(run_endpoints(run), on_events, on_status, on_heartbeat=on_heartbeat))

    async def run(self) -> None:
        await self.client.run()

    async def command(self, cmd: str, args: dict[str, Any] | None = None) -> Reply:
        try:
            return await self.client.command(cmd, args)
        except ClientError as error:
            return Reply("", False, str(error))

    def close(self) -> None:
        self.client.close()
