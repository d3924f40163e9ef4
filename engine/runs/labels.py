"""A run's tags and note: reading them cheaply, and changing them live or on a run at rest.

Tags and a note are journaled events (``tags`` carries the whole list after a change, ``note``
the whole text), so they survive, replay and travel with the run like everything else. Until
the first ``tags`` event a run's tags are its config's top-level ``tags``.

Reading: :func:`labels_of` is the one call other code uses (the runs list, ``ls``, compare,
sweeps). It reads ``tags`` and ``note`` from status.json (the engine keeps them there, as it
keeps the iteration and loss), so hundreds of runs cost one small file each; a run whose
status has no labels (a run of an older version, or a change cut short by a crash) falls back
to its history digest (tunetop.control.history), never a full journal read.

Changing: :func:`change_labels`. A live run's engine owns its journal, so the change goes to
it as a ``tag`` or ``note`` command. A run at rest is changed here, holding its lock as an
engine would (no engine can start meanwhile): status.json loses its labels, the event is
appended to the journal and fsynced, and only then does status.json get the new labels. A
crash anywhere in between leaves the journal whole and the status without labels, which the
next read answers from the digest. No mlx import here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tunetop.control.history import event_type
from tunetop.control.protocol import loads
from tunetop.runs.folders import RunDir, RunError, RunLock
from tunetop.training.config import MAX_TAGS, ConfigError, check_tags, control_character, tag_problem

MAX_NOTE_LENGTH = 2000


@dataclass
class Labels:
    """A run's tags (in the order they were added) and its note ("" for none)."""

    tags: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def note_line(self) -> str:
        """The note's first line, for one-line displays."""
        return self.note.strip().split("\n", 1)[0]


class LabelError(ValueError):
    """A tag or note that cannot be used, or a change that could not be made; the text says why.

    ``unreachable``: the engine did not take the change (no answer, or a refusal), not the input's fault."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def note_problem(text: object) -> str:
    """Why ``text`` is no valid note ("" when it is one)."""
    if not isinstance(text, str):
        return f"a note must be a string, got {type(text).__name__}"
    if len(text) > MAX_NOTE_LENGTH:
        return f"a note of {len(text):,} characters; at most {MAX_NOTE_LENGTH:,} are kept (put longer text in a file)"
    if bad := control_character(text, allowed="\n\t"):
        return f"a note holds the control character {bad}, which would reach terminals as a command; use printable text (line breaks and tabs are fine)"
    return ""


def apply_tag_change(tags: list[str], add: list[str], remove: list[str]) -> list[str]:
    """The tags after adding ``add`` and removing ``remove``; LabelError for a bad tag or too many."""
    for tag in [*add, *remove]:
        problem = tag_problem(tag)
        if problem:
            raise LabelError(problem)
    gone = set(remove)
    result = [t for t in tags if t not in gone]
    result += [t for t in dict.fromkeys(add) if t not in result and t not in gone]
    if len(result) > MAX_TAGS:
        raise LabelError(f"a run takes at most {MAX_TAGS} tags; this change would give it {len(result)}")
    return result


def config_tags(run: RunDir) -> list[str]:
    """The top-level ``tags`` of the run's config (none when unreadable or invalid)."""
    import tomllib

    try:
        raw = tomllib.loads(run.config.read_text(encoding="utf-8")).get("tags", [])
        return check_tags(raw)
    except (OSError, ValueError, ConfigError):  # tomllib's error is a ValueError
        return []


def fold_labels(payloads: list[bytes], tags: list[str]) -> Labels:
    """Labels from journaled events in seq order (only ``tags`` and ``note`` are decoded)."""
    labels = Labels(list(tags))
    for payload in payloads:
        kind = event_type(payload)
        if kind == b"tags":
            labels.tags = [str(t) for t in loads(payload).get("tags") or []]
        elif kind == b"note":
            labels.note = str(loads(payload).get("text") or "")
    return labels


def labels_from_history(run: RunDir) -> Labels:
    """Labels from the run's history digest (rare events are kept whole there)."""
    from tunetop.control.history import read_history

    try:
        _upto, records = read_history(run.journal)
    except (OSError, ValueError):  # no journal yet, or not a journal: only the config speaks
        records = []
    return fold_labels([payload for _seq, payload in records], config_tags(run))


def labels_of(run: RunDir, status: dict[str, Any] | None = None) -> Labels:
    """A run's current tags and note: from status.json when it has them, else the history digest.

    ``status`` is the run's ``status()`` when the caller has read it already.
    """
    status = run.status() if status is None else status
    tags, note = status.get("tags"), status.get("note")
    if isinstance(tags, list) and isinstance(note, str):
        return Labels([str(t) for t in tags], note)
    return labels_from_history(run)


def status_labels(labels: Labels) -> dict[str, Any]:
    """The labels as status.json keeps them."""
    return {"tags": list(labels.tags), "note": labels.note}


# -- changing -------------------------------------------------------------------------------


def change_labels(
    run: RunDir,
    add: list[str] | None = None,
    remove: list[str] | None = None,
    note: str | None = None,
    timeout: float = 30.0,
) -> Labels:
    """Add and remove tags and (``note`` not None) replace the note; returns the labels after.

    A live run's engine journals the change (``tag`` / ``note`` commands); a run at rest is
    changed here under its lock. LabelError for a bad tag or note, or when neither way works
    (an engine that does not answer, a lock held by something else).
    """
    add, remove = list(add or []), list(remove or [])
    apply_tag_change([], add, remove)  # a bad tag is refused before anything is sent or written
    if note is not None and (problem := note_problem(note)):
        raise LabelError(problem)
    deadline = time.monotonic() + timeout
    while True:
        if run.is_alive():
            labels = _change_live(run, add, remove, note, max(deadline - time.monotonic(), 1.0))
            if labels is not None:
                return labels
        else:
            try:
                return _change_at_rest(run, add, remove, note)
            except RunError:
                if not run.is_alive():
                    raise
        # The engine ended (or started) between the look and the change: look again.
        if time.monotonic() > deadline:
            raise LabelError(f"run {run.id}'s engine neither took the change nor ended within {timeout:.0f}s; try again",
                             unreachable=True)
        time.sleep(0.2)


def _change_live(run: RunDir, add: list[str], remove: list[str], note: str | None, timeout: float) -> Labels | None:
    """Send the change to the engine; None when the engine ended before taking it."""
    from tunetop.runs.client_sync import send_command

    result: dict[str, Any] = {}
    try:
        if add or remove or note is None:
            reply = send_command(run, "tag", {"add": add, "remove": remove}, timeout=timeout)
            if not reply.ok:
                _refuse(run, "tag", reply.error)
                return None
            result.update(reply.result)
        if note is not None:
            reply = send_command(run, "note", {"text": note}, timeout=timeout)
            if not reply.ok:
                _refuse(run, "note", reply.error)
                return None
            result.update(reply.result)
    except TimeoutError as error:
        if run.is_alive():
            raise LabelError(str(error), unreachable=True) from None
        return None
    now = labels_of(run)  # the engine wrote its status before it replied
    tags, text = result.get("tags"), result.get("text")
    return Labels([str(t) for t in tags] if isinstance(tags, list) else now.tags, text if isinstance(text, str) else now.note)


def _refuse(run: RunDir, cmd: str, error: str) -> None:
    """LabelError for the engine's refusal, unless it refused because its run ended (the change
    is then made at rest once the engine has gone)."""
    if run.is_alive() and not error.startswith("the run has"):
        raise LabelError(f"{cmd} refused: {error}", unreachable="busy" in error)


def _change_at_rest(run: RunDir, add: list[str], remove: list[str], note: str | None) -> Labels:
    """Journal the change under the run's lock, crash-safe (see the module's docstring)."""
    from tunetop.control.journal import JournalWriter
    from tunetop.control.protocol import make_event

    lock = RunLock(run)
    lock.acquire()  # RunError when an engine took the run meanwhile
    try:
        status = run.status()
        labels = labels_of(run, status)
        tags = apply_tag_change(labels.tags, add, remove)
        events: list[tuple[str, dict[str, Any]]] = []
        if tags != labels.tags:
            events.append(("tags", {"tags": tags}))
        if note is not None and note != labels.note:
            events.append(("note", {"text": note}))
        if not events:
            return labels
        # Status first loses its labels, so a crash before the journal's fsync leaves readers
        # asking the digest, never trusting a status that says more or less than the journal.
        bare = {k: v for k, v in status.items() if k not in ("tags", "note")}
        if status:
            run.write_status(bare)
        writer = JournalWriter(run.journal)
        try:
            for repaired in writer.repairs:  # what opening mended, journaled as an engine would
                writer.append(make_event(run.id, writer.last_seq + 1, "warning", message=repaired))
            for type_, fields in events:
                writer.append(make_event(run.id, writer.last_seq + 1, type_, **fields))
            writer.sync()
        finally:
            writer.close()
        after = Labels(tags, labels.note if note is None else note)
        if status:
            run.write_status({**bare, **status_labels(after)})
        return after
    finally:
        lock.release()
