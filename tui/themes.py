"""Theme files (themes/*.toml) and the remembered choice.

A theme file holds the fields of ``textual.theme.Theme``. The chosen theme is remembered in
$XDG_CONFIG_HOME/tunetop/tui.json (default ~/.config/tunetop/tui.json).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from textual.theme import Theme

THEMES_DIR = Path(__file__).resolve().parent.parent / "themes"
DEFAULT_THEME = "tunetop-dark"
SHORT_NAMES = {"dark": "tunetop-dark", "light": "tunetop-light", "high-contrast": "tunetop-high-contrast"}
FIELDS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground", "background", "surface", "panel")


COLOR_FALLBACKS = {"warning": "yellow"}
"""A colour a theme leaves out: this one, or else the theme's primary colour."""


def theme_color(theme: Theme, name: str) -> str:
    """The theme's colour called ``name`` (``accent``, ``warning``, ``success``, ...), never empty."""
    return str(getattr(theme, name, None) or COLOR_FALLBACKS.get(name) or theme.primary)


def themed(style: str, theme: Theme) -> str:
    """A Rich style with each ``$name`` (a theme colour, as in Textual CSS) replaced by the theme's colour."""
    for name in FIELDS:
        if f"${name}" in style:
            style = style.replace(f"${name}", theme_color(theme, name))
    return style


class ThemeError(ValueError):
    """A theme file that cannot be used."""


def load_theme_file(path: Path) -> Theme:
    """Parse one theme file; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ThemeError(f"{path}: cannot read theme: {error}") from None
    if not isinstance(data.get("name"), str) or not isinstance(data.get("primary"), str):
        raise ThemeError(f"{path}: a theme needs string keys 'name' and 'primary'.")
    unknown = set(data) - {"name", "dark", *FIELDS}
    if unknown:
        raise ThemeError(f"{path}: unknown theme keys {', '.join(sorted(unknown))}; valid: name, dark, {', '.join(FIELDS)}.")
    kwargs = {k: data[k] for k in FIELDS if k in data}
    return Theme(name=data["name"], dark=bool(data.get("dark", True)), **kwargs)


def load_themes(directory: Path = THEMES_DIR) -> list[Theme]:
    """Every theme file in ``directory``, sorted by file name."""
    return [load_theme_file(path) for path in sorted(directory.glob("*.toml"))]


def settings_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunetop" / "tui.json"


def remembered_theme() -> str | None:
    try:
        value = json.loads(settings_path().read_text()).get("theme")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def remember_theme(name: str) -> None:
    path = settings_path()
    try:
        settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            settings = {}
    except (FileNotFoundError, json.JSONDecodeError):
        settings = {}
    settings["theme"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(settings, indent=2))
    os.replace(temp, path)
