"""A footer that keeps the most needed keys when not all of them fit the terminal's width.

Textual's Footer lays every key out in a row and cuts what passes the edge: at 120 columns a
live run's dashboard lost g, ? and q. This one drops keys in the reverse of the screen's
``FOOTER_PRIORITY`` (action names, the most needed first) until the rest fit; the dropped keys
still work, and help (?) and the command palette list them.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.events import Resize
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def key_width(key: FooterKey) -> int:
    """Cells a (non-compact) footer key takes: its key, a space and its description, padded."""
    return len(key.key_display) + (len(key.description) + 1 if key.description else 0) + 2


class KeysFooter(Footer):
    """Footer keys that fit, chosen by the screen's ``FOOTER_PRIORITY``, in the bindings' order."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._composed_width = 0

    def compose(self) -> ComposeResult:
        widgets: list[Widget] = list(super().compose())
        width = self.app.size.width
        self._composed_width = width
        keys = [w for w in widgets if isinstance(w, FooterKey) and not w.has_class("-command-palette")]
        room = width - sum(key_width(w) for w in widgets if isinstance(w, FooterKey) and w not in keys)
        if sum(key_width(k) for k in keys) <= room:
            yield from widgets
            return
        priority = list(getattr(self.screen, "FOOTER_PRIORITY", ()))
        rank = {action: number for number, action in enumerate(priority)}
        kept: set[int] = set()
        for key in sorted(keys, key=lambda k: rank.get(k.action, len(rank))):
            if key_width(key) <= room:
                kept.add(id(key))
                room -= key_width(key)
        shown = [w for w in widgets if w not in keys or id(w) in kept]
        self.styles.grid_size_columns = len([w for w in shown if w in keys])
        yield from shown

    def on_resize(self, _event: Resize) -> None:
        if self.app.size.width != self._composed_width:
            self.refresh(recompose=True)
