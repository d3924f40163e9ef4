"""The Playground: prompt the live adapter and watch the same prompts change as training goes.

A prompt typed here becomes a ``sample`` command; the engine formats it as the run's training
data put its prompts (the chat template for chat data), or sends it as typed when "raw" is
ticked, runs it between two steps with the weights as they are and publishes a ``sample``
event. Every sample of the run (typed here, by another client, or from
``sampling.sample_prompts``) is shown in one column per prompt (raw prompts apart), newest
prompt first, each column listing its completions by iteration, latest on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Label, Static

from tunetop.control.replies import prompt_format_text

if TYPE_CHECKING:
    from tunetop.tui.screens.dashboard import DashboardScreen

MAX_COLUMNS = 4  # prompts side by side; older prompts stay in the run's journal and log
HINT = "prompts go to the model as the training data's did (the chat template for chat data); tick raw (ctrl+t) to send one as typed"


Column = tuple[tuple[str, bool], list[tuple[int, str]]]
"""((prompt, raw), [(iteration, completion), ...])"""


def columns(samples: list[tuple[int, str, str, bool]], limit: int = MAX_COLUMNS) -> list[Column]:
    """Samples grouped by prompt and rawness: the most recently sampled first, completions newest first."""
    by_key: dict[tuple[str, bool], list[tuple[int, str]]] = {}
    last_seen: dict[tuple[str, bool], int] = {}
    for index, (iteration, prompt, completion, raw) in enumerate(samples):
        by_key.setdefault((prompt, raw), []).append((iteration, completion))
        last_seen[(prompt, raw)] = index
    ordered = sorted(by_key, key=lambda key: last_seen[key], reverse=True)[:limit]
    return [(key, list(reversed(by_key[key]))) for key in ordered]


def column_title(prompt: str, raw: bool) -> str:
    """A column's title: the prompt, shortened, marked when it was sent raw."""
    title = prompt if len(prompt) < 40 else prompt[:39] + "…"
    return f"raw: {title}" if raw else title


class PlaygroundScreen(Screen[None]):
    """Type a prompt, read the completion from the live adapter, with the iteration it came from."""

    DEFAULT_CSS = """
    PlaygroundScreen #form { height: 3; }
    PlaygroundScreen #prompt { width: 1fr; }
    PlaygroundScreen .field-label { width: auto; padding: 1 0 0 1; color: $text-muted; }
    PlaygroundScreen #max-tokens { width: 10; }
    PlaygroundScreen #temperature { width: 10; }
    PlaygroundScreen #raw { width: auto; }
    PlaygroundScreen #status { height: 1; padding: 0 1; }
    PlaygroundScreen #samples { height: 1fr; }
    PlaygroundScreen .column { width: 1fr; border: round $primary; padding: 0 1; }
    PlaygroundScreen .column-title { text-style: bold; }
    """

    BINDINGS = [
        Binding("escape", "back", "Dashboard"),
        Binding("ctrl+r", "resample", "Sample all again"),
        Binding("ctrl+t", "toggle_raw", "Raw prompt"),
    ]

    def __init__(self, dashboard: DashboardScreen) -> None:
        super().__init__()
        self.dashboard = dashboard
        self._shown = -1
        self.status_text = ""

    def compose(self) -> ComposeResult:
        sampling = (self.dashboard.run_state.config or {}).get("sampling", {})
        with Horizontal(id="form"):
            yield Input(placeholder="prompt, then enter: completed between two steps with the current weights", id="prompt")
            yield Label("max tokens", classes="field-label")
            yield Input(str(sampling.get("max_tokens", 64)), placeholder="64", id="max-tokens", type="integer")
            yield Label("temperature", classes="field-label")
            yield Input(str(sampling.get("temperature", 0.0)), placeholder="0.0", id="temperature", type="number")
            yield Checkbox("raw", id="raw", tooltip="send the prompt as typed (ctrl+t); else formatted as the training data's prompts")
        yield Static(HINT, id="status")
        yield Horizontal(id="samples")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        self.refresh_samples()
        self.set_interval(0.25, self.refresh_samples)

    def show_status(self, text: str, error: bool = False) -> None:
        self.status_text = text
        self.query_one("#status", Static).update(Text(text, style="bold red" if error else "green"))

    def refresh_samples(self) -> None:
        """Redraw the columns when samples arrived (the dashboard folds the events)."""
        samples = self.dashboard.run_state.samples
        if len(samples) == self._shown:
            return
        self._shown = len(samples)
        box = self.query_one("#samples", Horizontal)
        box.remove_children()
        if not samples:
            box.mount(Label("No samples yet: type a prompt above, or set sampling.sample_prompts in the config."))
            return
        for (prompt, raw), completions in columns(samples):
            column = VerticalScroll(classes="column")
            column.border_title = Text(column_title(prompt, raw))  # Text: a prompt's [x] is not markup
            box.mount(column)
            for iteration, completion in completions:
                entry = Text()
                entry.append(f"iter {iteration:,}\n", style="bold")
                entry.append(prompt, style="dim")
                # A raw prompt is continued by the model; a formatted one is answered, so the answer
                # gets a line of its own instead of reading as if the model repeated the question.
                entry.append(completion if raw else f"\n→ {completion}")
                column.mount(Static(entry, classes="sample"))

    def _request(self) -> dict[str, Any] | None:
        prompt = self.query_one("#prompt", Input).value
        if not prompt.strip():
            self.show_status("type a prompt first", error=True)
            return None
        args: dict[str, Any] = {"prompt": prompt, "raw": self.query_one("#raw", Checkbox).value}
        try:
            args["max_tokens"] = int(self.query_one("#max-tokens", Input).value)
            args["temperature"] = float(self.query_one("#temperature", Input).value)
        except ValueError:
            self.show_status("max tokens must be a whole number and temperature a number", error=True)
            return None
        return args

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        args = self._request()
        if args is not None:
            self.sample(args)
            self.query_one("#prompt", Input).value = ""  # the next question starts in an empty box

    def action_resample(self) -> None:
        """Every prompt on screen again, with the weights as they are now."""
        for (prompt, raw), _ in columns(self.dashboard.run_state.samples):
            self.sample({"prompt": prompt, "raw": raw})

    def action_toggle_raw(self) -> None:
        """Send prompts as typed, or formatted as the training data's prompts were."""
        self.query_one("#raw", Checkbox).toggle()

    def sample(self, args: dict[str, Any]) -> None:
        self.run_worker(self._sample(args), exclusive=False)

    async def _sample(self, args: dict[str, Any]) -> None:
        self.show_status(f"sampling {args['prompt']!r} between two steps…")
        reply = await self.dashboard.source.command("sample", args)
        if reply.ok:
            how = prompt_format_text(reply.result)
            how = f", {how}" if how else ""
            self.show_status(f"sample: ok, from the weights of iteration {reply.result.get('iteration')}{how}")
        else:
            self.show_status(f"sample: {reply.error}", error=True)

    def action_back(self) -> None:
        self.app.pop_screen()
