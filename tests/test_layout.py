"""The layout's stated invariants: the TUI and the config need no MLX.

The TUI validates configs, starts and resumes runs, and attaches, on machines where only the
engine has MLX (the docstrings of config, protocol, runs, launch... say "no mlx import"). Here a
subprocess in which importing mlx fails imports every TUI module and the engine modules the
TUI uses, and validates a config.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MLX_AT_MODULE_LEVEL = {
    "tunetop.training.trainer", "tunetop.training.adapters", "tunetop.training.chunked_loss",
    "tunetop.training.lora_precision", "tunetop.training.packing",
}
"""docs/ARCHITECTURE.md: the only modules that import mlx when they are imported; every other
module (the CLI, the TUI, the engine's process code) reaches mlx inside functions, so a machine
without MLX can validate configs, start nothing heavy, and attach."""

NO_MLX = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class NoMLX:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlx", "mlx_lm"):
                raise ImportError(f"mlx is not installed here (blocked by the test): {name}")
            return None

    sys.meta_path.insert(0, NoMLX())
    import tunetop, tunetop.tui
    names = [m.name for m in pkgutil.walk_packages(tunetop.__path__, "tunetop.")]
    names += ["tunetop.tui"] + [m.name for m in pkgutil.walk_packages(tunetop.tui.__path__, "tunetop.tui.")]
    failed = []
    for name in names:
        if not name.endswith("__main__"):
            try:
                importlib.import_module(name)
            except ImportError:
                failed.append(name)
    from tunetop.training import config
    config.parse(config.starter_text(), source="starter.toml")
    from tunetop.runs.launch import load_run_config
    print(load_run_config(sys.argv[1]).name)
    print("ok", len(names), ",".join(sorted(failed)))
    """
)


def test_tui_and_config_import_without_mlx(tmp_path: Path) -> None:
    from tunetop.training.config import starter_text

    config = tmp_path / "starter.toml"
    config.write_text(starter_text(), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", NO_MLX, str(config)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    name, ok, count, *failed = result.stdout.split()
    assert (name, ok) == ("starter", "ok") and int(count) > 60
    assert set(",".join(failed).split(",")) - {""} <= MLX_AT_MODULE_LEVEL, "these import mlx when imported: " + failed[0]


MAY_IMPORT = {
    "helpers": {"helpers"},
    "control": {"helpers", "control"},
    "training": {"helpers", "training"},
    "runs": {"helpers", "control", "training", "runs"},
    "interop": {"helpers", "control", "training", "interop", "runs.folders"},
    "tui": {"helpers", "control", "runs", "training.config", "training.checkpoint", "tui"},
    "cli": {"helpers", "control", "training", "runs", "interop", "cli"},
}
"""docs/ARCHITECTURE.md's table: what each package may import at module level (lazy imports
inside functions are the exceptions the doc names)."""


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in (("engine", "tunetop"), ("tui", "tunetop.tui")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("training", "control", "runs", "interop", "tui", "cli"):
        return parts[1]
    return "helpers"  # tunetop itself, blas, atomic, private, faults, userfiles


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run on import: the top level, inside try/if/with at the top level too, but
    not `if TYPE_CHECKING:` (names for the type checker only)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.extend(_module_level(node.orelse))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            inner = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            inner += [s for handler in getattr(node, "handlers", []) for s in handler.body]
            found.extend(_module_level(inner))
        else:
            found.append(node)
    return found


def _module_level_imports(modules: dict[str, Path]) -> dict[str, set[str]]:

    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunetop"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("tunetop"))
        imports[name] = found - {name}
    return imports


def test_each_package_imports_only_what_the_architecture_allows() -> None:
    modules = _modules()
    wrong = []
    for name, targets in _module_level_imports(modules).items():
        allowed = MAY_IMPORT[_part(name)]
        for target in targets:
            short = target.removeprefix("tunetop.")
            if _part(target) not in allowed and not any(short == a or short.startswith(a + ".") for a in allowed):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports docs/ARCHITECTURE.md does not allow: " + "; ".join(sorted(wrong))


def test_no_module_level_import_cycles() -> None:
    imports = _module_level_imports(_modules())
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for target in sorted(imports.get(name, ())):
            if seen.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target not in seen:
                visit(target, [*path, target])
        seen[name] = 2

    for name in sorted(imports):
        if name not in seen:
            visit(name, [name])


def test_code_imports_the_installed_names_only() -> None:
    """engine/ and tui/ are folders, not packages: `import tui.app` from the checkout's root would
    load a second copy of the module beside tunetop.tui.app (its classes then differ)."""
    pattern = re.compile(r"^\s*(?:from|import)\s+(engine|tui)(?:\.|\s)", re.MULTILINE)
    wrong = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for folder in ("engine", "tui", "tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for match in pattern.finditer(path.read_text())
    ]
    assert not wrong, "import tunetop.* instead: " + "; ".join(wrong)
