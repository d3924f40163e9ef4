"""Command replies as sentences a person reads: the same words in the CLI and the TUI.

A reply's ``result`` is data for programs (``tunetop pause --json`` prints it whole); this
module says what happened, with numbers rounded as the screen shows them. No mlx import.
"""

from __future__ import annotations

from typing import Any

from tunetop.control.protocol import Reply


def loss_text(value: Any) -> str:
    """A loss to four significant digits (``1.047``); ``-`` when missing, ``nan`` when not finite."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}"


def _iteration(result: dict[str, Any]) -> str:
    value = result.get("iteration")
    return f"iteration {value:,}" if isinstance(value, int) else ""


PROMPT_FORMATS = {"chat": "in the chat template", "completion": "as a prompt", "text": "as text", "raw": "raw, as typed"}
"""How a sample's prompt went to the model (its ``prompt_format``), in words."""


def prompt_format_text(result: dict[str, Any]) -> str:
    """``prompt in the chat template``, or "" for a reply without a known ``prompt_format``."""
    words = PROMPT_FORMATS.get(str(result.get("prompt_format")), "")
    return f"prompt {words}" if words else ""


def describe_result(cmd: str, result: dict[str, Any]) -> str:
    """What an accepted command did, without the command's name: ``iteration 234, validation loss 1.047``."""
    note = str(result.get("note") or "")
    if cmd == "pause":
        return note or f"paused at {_iteration(result)}".strip()
    if cmd == "resume":
        return note or "training again"
    if cmd == "stop":
        return f"stopping at {_iteration(result)}: the adapter is saved, then the run ends"
    if cmd == "save":
        where = result.get("checkpoint") or result.get("path") or ""
        return f"saved {_iteration(result)}" + (f" to {where}" if where else "")
    if cmd == "evaluate":
        return f"{_iteration(result)}, validation loss {loss_text(result.get('loss'))}"
    if cmd == "set":
        changes = result.get("changes") or {}
        return ", ".join(f"{key} = {_number(value)}" for key, value in changes.items()) or "nothing changed"
    if cmd == "status":
        done, total = result.get("iteration"), result.get("iterations")
        of = f" of {total:,}" if isinstance(total, int) else ""
        at = f", iteration {done:,}{of}" if isinstance(done, int) else ""
        return f"{result.get('state') or 'unknown'}{at}"
    if cmd == "sample":
        how = prompt_format_text(result)
        return f"from the weights of {_iteration(result)}{', ' + how if how else ''}:\n{result.get('completion', '')}"
    if cmd == "tag":
        return "tags: " + (", ".join(str(t) for t in result.get("tags") or []) or "none")
    if cmd == "note":
        return f"note: {result.get('text')}" if result.get("text") else "note cleared"
    # A command this module does not know yet: its fields, each one readable.
    return ", ".join(f"{key} {_number(value)}" for key, value in result.items() if key != "note") + (
        f" ({note})" if note else ""
    )


def describe(cmd: str, reply: Reply) -> str:
    """One line (sample: the completion below it): ``evaluate: ok — iteration 234, validation loss 1.047``."""
    if not reply.ok:
        return f"{cmd}: refused — {reply.error}"
    detail = describe_result(cmd, reply.result)
    return f"{cmd}: ok — {detail}" if detail else f"{cmd}: ok"
