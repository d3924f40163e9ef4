"""TensorBoard event files: scalars, the run's config as text, and its hyper-parameters.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, data, masked
CRC-32C of the data), each holding one serialized ``tensorflow.Event``. The messages are built
with tensorboardX's protobuf classes and summary helpers (``hparams`` for the HParams plugin,
``text`` for the text plugin), and framed with its CRC; the file handling is tunetop's own,
because a record that does not fit on a full disk must be kept and written later, whole.

With ``metrics.tensorboard = true`` the engine writes ``tensorboard/`` in the run folder as it
trains, so ``tensorboard --logdir ~/.local/state/tunetop/runs`` shows every run (the HParams tab
compares their settings against their losses); ``tunetop export-metrics RUN --format tensorboard
--output DIR`` writes the same from a journal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any


def encode_event(
    wall_time: float, step: int = 0, file_version: str = "", scalars: dict[str, float] | None = None, summary: Any = None
) -> bytes:
    """One serialized ``Event``: a file-version header, scalars at a step, or a prepared ``Summary``."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    event = Event(wall_time=wall_time, step=step)
    if file_version:
        event.file_version = file_version
    if scalars:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])
    if summary is not None:
        event.summary.CopyFrom(summary)
    return bytes(event.SerializeToString())


def frame(data: bytes) -> bytes:
    """A TFRecord around one serialized event."""
    from tensorboardX.record_writer import masked_crc32c

    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as HParams values: ``section.key`` -> a number, string or boolean."""
    out: dict[str, Any] = {}
    for section, values in config.items():
        if not isinstance(values, dict):
            out[section] = values if isinstance(values, (int, float, str, bool)) else json.dumps(values)
            continue
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def config_text(config: dict[str, Any]) -> str:
    """The config as TOML, a Markdown code block for TensorBoard's text plugin."""
    import tomli_w

    return "\n".join("    " + line for line in tomli_w.dumps(config).splitlines())


SCALARS = {
    "train": {
        "loss": "train/loss",
        "learning_rate": "train/learning_rate",
        "tokens_per_second": "train/tokens_per_second",
        "iterations_per_second": "train/iterations_per_second",
        "peak_memory": "train/peak_memory_gb",
    },
    "validation": {"loss": "validation/loss"},
}
"""Which journal event fields become which TensorBoard tags."""

METRICS = ("train/loss", "validation/loss")
"""The metrics the HParams tab shows against each run's settings."""


class TensorBoardWriter:
    """Appends scalars to one event file in ``folder``, each record written at once.

    A record that cannot be written (a full disk) is kept, in order, and written by the next
    write or ``flush``; the failed write is cut off the file again, so no torn record is left.
    ``private`` (the engine's own files) makes the folder 0700 and the file 0600.
    """

    name = "TensorBoard"

    def __init__(self, folder: Path, private: bool = False) -> None:
        folder.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.tunetop"
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if private else 0o666)
        self._size = os.fstat(self._fd).st_size
        self._pending: list[bytes] = [frame(encode_event(now, file_version="brain.Event:2"))]
        with contextlib.suppress(OSError):  # kept pending: the first scalar's write reports it
            self.flush()

    @property
    def pending(self) -> int:
        """Records waiting for space."""
        return len(self._pending)

    def _write(self, event: bytes) -> None:
        self._pending.append(frame(event))
        self.flush()

    def flush(self) -> None:
        """Write the pending records in order; OSError naming the file if one cannot be written."""
        while self._pending:
            record = self._pending[0]
            try:
                if os.write(self._fd, record) != len(record):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                raise OSError(error.errno, error.strerror, str(self.path)) from None
            self._size += len(record)
            self._pending.pop(0)

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        self._write(encode_event(wall_time or time.time(), step=step, scalars=values))

    def run_started(self, config: dict[str, Any], wall_time: float | None = None) -> None:
        """The config as text (tag ``config``) and as hyper-parameters (the HParams plugin)."""
        from tensorboardX.summary import hparams, text

        when = wall_time or time.time()
        experiment, session_start, _end = hparams(hyperparameters(config), {tag: 0.0 for tag in METRICS})
        for summary in (text("config", config_text(config)), experiment, session_start):
            self._write(encode_event(when, summary=summary))

    def finished(self, wall_time: float | None = None) -> None:
        """Marks the HParams session as ended."""
        from tensorboardX.summary import hparams

        self._write(encode_event(wall_time or time.time(), summary=hparams({}, {})[2]))

    def on_event(self, event: dict[str, Any], _raw: bytes = b"") -> None:
        """An :class:`engine.events.EventLog` subscriber: train and validation events become scalars,
        the run's start its config and hyper-parameters."""
        kind = event.get("type", "")
        if kind == "run_started" and isinstance(event.get("config"), dict):
            self.run_started(event["config"], float(event.get("ts") or time.time()))
            return
        if kind == "finished":
            self.finished(float(event.get("ts") or time.time()))
            return
        fields = SCALARS.get(kind)
        if not fields:
            return
        values = {tag: float(event[key]) for key, tag in fields.items() if isinstance(event.get(key), (int, float))}
        if values:
            self.scalars(int(event.get("iteration", 0)), values, float(event.get("ts") or time.time()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        os.close(self._fd)


def write_from_events(events: list[dict[str, Any]], folder: Path) -> Path:
    """An event file holding a journal's scalars, config and hyper-parameters."""
    writer = TensorBoardWriter(folder)
    try:
        for event in events:
            writer.on_event(event)
    finally:
        writer.close()
    return writer.path
