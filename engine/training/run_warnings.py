"""Every warning a run produces becomes a journaled ``warning`` event: one per cause, with a count.

While a run sets up and trains, :class:`WarningSink` takes over Python's ``warnings.showwarning``
(the data layer's notes on examples cut short, mlx-lm's and any library's warnings) and listens to
the loggers of the libraries that report through ``logging`` (transformers' tokenizer warnings,
huggingface_hub, datasets). A cause is the warning's source and text: its first occurrence is
emitted at once, with the count it carries (how many examples, for the data layer's); repeats
are only counted, and when the run ends one more event gives the total of each repeated cause.
So a warning raised every step costs one event, not one per step, and none reaches stderr as a
raw ``UserWarning`` that the journal, the TUI and ``tunetop events`` never see.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

LOGGERS = ("transformers", "huggingface_hub", "datasets", "mlx_lm", "tokenizers")
"""Libraries whose logged warnings a run reports."""

Emit = Callable[..., Any]


class _LogHandler(logging.Handler):
    def __init__(self, sink: WarningSink) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.add(record.getMessage(), record.name.split(".")[0])
        except Exception:  # a broken warning must never break the run
            self.handleError(record)


class WarningSink:
    """A context manager: while active, warnings become ``emit("warning", message=..., count=...,
    source=...)`` calls, one per cause."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}  # cause -> occurrences
        self._previous: Any = None
        self._handler = _LogHandler(self)

    def add(self, message: str, source: str, count: int = 1) -> None:
        """One occurrence of a warning; ``count`` is what it stands for (examples...) on first sight."""
        key = (source, message)
        with self._lock:
            first = key not in self._seen
            self._seen[key] = self._seen.get(key, 0) + 1
        if first:
            self.emit("warning", message=message, count=count, source=source)

    def _show(self, message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        count = getattr(message, "count", 1)
        self.add(str(message), category.__name__, count if isinstance(count, int) else 1)

    def __enter__(self) -> WarningSink:
        self._previous = warnings.showwarning
        warnings.showwarning = self._show
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        warnings.showwarning = self._previous
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        self.flush()

    def flush(self) -> None:
        """One event per cause that came more than once, with its total."""
        with self._lock:
            repeated = [(key, n) for key, n in self._seen.items() if n > 1]
            for key, _n in repeated:
                self._seen[key] = 1
        for (source, message), times in repeated:
            self.emit("warning", message=f"{message} (this warning came {times} times in all)", count=times, source=source)
