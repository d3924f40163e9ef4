"""The layout's stated invariants: the TUI and the config need no MLX.

The TUI validates configs, starts and resumes runs, and attaches, on machines where only the
engine has MLX (the docstrings of config, protocol, runs, launch... say "no mlx import"). Here a
subprocess in which importing mlx fails imports every TUI module and the engine modules the
TUI uses, and validates a config.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NO_MLX = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class NoMLX:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlx", "mlx_lm"):
                raise ImportError(f"mlx is not installed here (blocked by the test): {name}")
            return None

    sys.meta_path.insert(0, NoMLX())
    import tui
    names = ["tui"] + [m.name for m in pkgutil.walk_packages(tui.__path__, "tui.")]
    names += ["engine.config", "engine.protocol", "engine.launch", "engine.checkpoint", "engine.runs",
              "engine.daemon", "engine.client_sync", "engine.replies", "engine.ssh", "engine.journal",
              "engine.history", "engine.export"]
    for name in names:
        importlib.import_module(name)
    from engine import config
    config.parse(config.starter_text(), source="starter.toml")
    from engine.launch import load_run_config
    print(load_run_config(sys.argv[1]).name)
    assert not [m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm")]
    print("ok", len(names))
    """
)


def test_tui_and_config_import_without_mlx(tmp_path: Path) -> None:
    from engine.config import starter_text

    config = tmp_path / "starter.toml"
    config.write_text(starter_text(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", NO_MLX, str(config)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["starter", "ok"]
