"""`tunetop tag RUN +x -y` and `tunetop note RUN "text"`: a run's tags and note (tunetop.runs.labels)."""

from __future__ import annotations

import argparse
import json

from tunetop.cli.common import _fail
from tunetop.exit_codes import EXIT_BAD_INPUT, EXIT_UNREACHABLE
from tunetop.runs.folders import RunError, resolve
from tunetop.runs.labels import LabelError, Labels, change_labels, labels_of


def split_tag_changes(words: list[str]) -> tuple[list[str], list[str]]:
    """``+x`` (or a bare ``x``) adds x, ``-y`` removes y; a word may hold several, comma-separated."""
    add: list[str] = []
    remove: list[str] = []
    for word in words:
        for part in filter(None, (p.strip() for p in word.split(","))):
            if part.startswith("-"):
                remove.append(part[1:])
            else:
                add.append(part[1:] if part.startswith("+") else part)
    return add, remove


def _print(run_id: str, labels: Labels, as_json: bool, what: str) -> None:
    if as_json:
        print(json.dumps({"run": run_id, "tags": labels.tags, "note": labels.note}))
    elif what == "tags":
        print(f"{run_id}: tags {', '.join(labels.tags) or '(none)'}")
    else:
        print(f"{run_id}: note {labels.note!r}" if labels.note else f"{run_id}: no note")


def tag_argv(argv: list[str]) -> list[str]:
    """``tag [RUN] +x -y`` for argparse: ``-y`` is a change, not an option, so the words go after ``--``."""
    options: list[str] = []
    words: list[str] = []
    rest = iter(argv[1:])
    for word in rest:
        if word in ("--json", "-h", "--help"):
            options.append(word)
        elif word == "--timeout" or word.startswith("--timeout="):
            options += [word] if "=" in word else [word, next(rest, "")]
        elif word != "--":
            words.append(word)
    if words and words[0][:1] in "+-":  # no RUN given: the latest run
        words.insert(0, "")
    return [argv[0], *options, "--", *words]


def cmd_tag(args: argparse.Namespace) -> int:
    run = resolve(args.run or None)
    add, remove = split_tag_changes(args.changes)
    if not add and not remove:
        _print(run.id, labels_of(run), args.json, "tags")
        return 0
    try:
        labels = change_labels(run, add, remove, timeout=args.timeout)
    except LabelError as error:
        return _fail(f"{run.id}: {error}", EXIT_UNREACHABLE if error.unreachable else EXIT_BAD_INPUT)
    _print(run.id, labels, args.json, "tags")
    return 0


def cmd_note(args: argparse.Namespace) -> int:
    try:
        run = resolve(args.run or None)
    except RunError as error:
        if args.text is None and args.run:  # `tunetop note "some text"`: the text taken for a run
            raise RunError(f"{error} The run comes first: `tunetop note RUN \"text\"` (RUN \"\" is the latest run).") from None
        raise
    if args.text is None and not args.clear:
        _print(run.id, labels_of(run), args.json, "note")
        return 0
    try:
        labels = change_labels(run, note="" if args.clear else args.text, timeout=args.timeout)
    except LabelError as error:
        return _fail(f"{run.id}: {error}", EXIT_UNREACHABLE if error.unreachable else EXIT_BAD_INPUT)
    _print(run.id, labels, args.json, "note")
    return 0
