"""Phase B of the architecture step: engine/ into sub-packages, installed as ``tunetop``.

Run from the repository root on a clean tree: it `git mv`s the modules and rewrites every
import and ``python -m engine.cli`` in code, tests, bench, docs and CI. Idempotence is not a
goal: throw the commit away and run it again on a newer main.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# old module (engine/NAME.py) -> new dotted path under tunetop
MOVES = {
    # the library's front and helpers every part uses
    "__init__": "",
    "cli": "cli",
    "blas": "blas",
    "atomic": "atomic",
    "private": "private",
    "faults": "faults",
    # training: config to model/data build, trainer, packing, losses, checkpoints, adapters
    "config": "training.config",
    "session": "runs.engine",
    "trainer": "training.trainer",
    "data": "training.data",
    "datasource": "training.datasource",
    "hf_data": "training.hf_data",
    "packing": "training.packing",
    "chunked_loss": "training.chunked_loss",
    "custom_loss": "training.custom_loss",
    "adapters": "training.adapters",
    "lora_precision": "training.lora_precision",
    "checkpoint": "training.checkpoint",
    "optimizers": "training.optimizers",
    "evaluation": "training.evaluation",
    "memory_budget": "training.memory_budget",
    "memory_plan": "training.memory_plan",
    # control plane: protocol, journal and its index, history, server, events, security
    "protocol": "control.protocol",
    "journal": "control.journal",
    "journal_index": "control.journal_index",
    "journal_repair": "control.journal_repair",
    "history": "control.history",
    "server": "control.server",
    "events": "control.events",
    "curve": "control.security",
    "endpoints": "control.endpoints",
    "client_sync": "control.client_sync",
    "replies": "control.replies",
    # runs and processes: run folders, launch, the engine process, distributed ranks
    "runs": "runs.folders",
    "launch": "runs.launch",
    "daemon": "runs.daemon",
    "distributed": "runs.distributed",
    "console": "runs.console",
    "write_trouble": "runs.write_trouble",
    "run_warnings": "runs.run_warnings",
    "ssh": "runs.ssh",
    # interop: export, import-config, metrics writers, hub, the embedded default
    "export": "interop.export",
    "import_config": "interop.import_config",
    "tensorboard": "interop.tensorboard",
    "trackers": "interop.trackers",
    "hub": "interop.hub",
    "demo": "interop.embedded",
}

SUBPACKAGES = {
    "training": "Training: a run's config, the model and data built from it, the loop, losses, checkpoints, adapters.",
    "control": "The control plane: the protocol, the journal and its digest, the event stream, the ZeroMQ server, security.",
    "runs": "Runs and processes: run folders, starting and resuming, the engine process, distributed ranks, ssh.",
    "interop": "Interop: export, import of mlx_lm configs, metrics writers and trackers, the Hub, the embedded default.",
}

TEXT_GLOBS = ["engine/**/*.py", "tui/**/*.py", "tests/**/*.py", "bench/**/*.py", "bench/**/*.sh", "docs/*.md",
              "README.md", ".ci/*", "pyproject.toml", "tui/**/*.tcss"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def main() -> int:
    root = Path.cwd()
    present = {p.stem for p in (root / "engine").glob("*.py")}
    unknown = present - set(MOVES)
    if unknown:
        print(f"no home for: {sorted(unknown)}; add them to MOVES", file=sys.stderr)
        return 1
    # 1. moves
    for sub, doc in SUBPACKAGES.items():
        (root / "engine" / sub).mkdir(exist_ok=True)
        init = root / "engine" / sub / "__init__.py"
        init.write_text(f'"""{doc}"""\n')
        sh("git", "add", str(init))
    for old, new in MOVES.items():
        if old not in present or not new or new == old:
            continue
        target = root / "engine" / (new.replace(".", "/") + ".py")
        sh("git", "mv", f"engine/{old}.py", str(target.relative_to(root)))

    # 2. rewrite imports: every intra-engine import becomes absolute tunetop.X
    full = {old: ("tunetop" + ("." + new if new else "")) for old, new in MOVES.items()}
    full["__init__"] = "tunetop"

    def engine_module(name: str) -> str:
        return full.get(name, f"tunetop.{name}")

    def rewrite_relative(text: str, package: str) -> str:
        # from .x import y  /  from .x.y import z  -> from tunetop.a.x import y
        def from_rel(m: re.Match[str]) -> str:
            mod = m.group(2)
            return f"{m.group(1)}from {engine_module(mod)} import"

        text = re.sub(r"(^|\n[ \t]*|\s)from \.([a-z_]+) import", lambda m: from_rel(m), text)
        # from . import config as config_module ; from . import hub
        def from_dot(m: re.Match[str]) -> str:
            names = [n.strip() for n in m.group(2).split(",")]
            out = []
            for n in names:
                base, _, alias = n.partition(" as ")
                target = engine_module(base.strip())
                pkg, _, leaf = target.rpartition(".")
                out.append(f"{m.group(1)}from {pkg} import {leaf}" + (f" as {alias.strip()}" if alias else (f" as {base.strip()}" if leaf != base.strip() else "")))
            return "".join(out)

        text = re.sub(r"(\n[ \t]*)from \. import ([^\n(]+)", from_dot, text)
        return text

    def rewrite_absolute(text: str) -> str:
        # engine.x -> tunetop.a.x (imports, strings, docs), engine alone -> tunetop
        def dotted(m: re.Match[str]) -> str:
            return engine_module(m.group(1))

        text = re.sub(r"(?<![\w./-])engine\.([a-z_]+)(?![a-z_])", lambda m: dotted(m) if m.group(1) in full else m.group(0), text)
        text = re.sub(r"(?<![\w./-])from engine import", "from tunetop import", text)
        text = re.sub(r"(?<![\w./-])import engine\b", "import tunetop", text)
        tui_modules = {p.stem for p in (root / "tui").glob("*.py")} | {p.name for p in (root / "tui").iterdir() if p.is_dir()}
        text = re.sub(r"(?<![\w./-])tui\.([a-z_]+)(?![\w])",
                      lambda m: f"tunetop.tui.{m.group(1)}" if m.group(1) in tui_modules else m.group(0), text)

        def file_path(m: re.Match[str]) -> str:
            new = MOVES.get(m.group(1))
            return f"engine/{new.replace('.', '/')}.py" if new else m.group(0)

        text = re.sub(r"(?<![\w./-])engine/([a-z_]+)\.py", file_path, text)
        text = re.sub(r"(?<![\w./-])from tui import", "from tunetop.tui import", text)
        text = re.sub(r"(?<![\w./-])import tui\b", "import tunetop.tui", text)
        return text

    files: set[Path] = set()
    for pattern in TEXT_GLOBS:
        files.update(p for p in root.glob(pattern) if p.is_file())
    for path in sorted(files):
        text = path.read_text(encoding="utf-8")
        new = text
        if path.suffix == ".py" and path.is_relative_to(root / "engine"):
            new = rewrite_relative(new, "")
        if path.suffix in (".py", ".sh", ".md", ".tcss") or path.parent.name == ".ci":
            new = rewrite_absolute(new)
        if new != text:
            path.write_text(new, encoding="utf-8")
    finish(root)
    return 0


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    if old not in text:
        raise SystemExit(f"{path}: expected text not found: {old!r}")
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def finish(root: Path) -> None:
    """What no pattern can do: the package's name, its aliases for tools, paths one level deeper."""
    # `tunetop` at the root and `tunetop/tui` inside it are aliases of engine/ and tui/: tools that
    # know no package-dir mapping (mypy, a source checkout without an install) see the package.
    (root / "tunetop").symlink_to("engine")
    (root / "engine" / "tui").symlink_to("../tui")
    sh("git", "add", "tunetop", "engine/tui")
    for module in ("daemon",):
        path = root / "engine" / "runs" / f"{module}.py"
        replace(path, "Path(__file__).resolve().parent.parent", "Path(__file__).resolve().parents[2]")
    init = root / "engine" / "__init__.py"
    text = init.read_text(encoding="utf-8")
    for name, new in (("trainer", "training.trainer"), ("adapters", "training.adapters"), ("data", "training.data"),
                      ("config", "training.config")):
        text = text.replace(f': "{name}",', f': "{new}",')
    init.write_text(text, encoding="utf-8")
    py = root / "pyproject.toml"
    replace(py, '''packages = ["engine", "tui", "tui.widgets", "tui.screens"]''',
            '''# The folders engine/ and tui/ install as one package, tunetop (docs/ARCHITECTURE.md says why).
packages = [
    "tunetop", "tunetop.training", "tunetop.control", "tunetop.runs", "tunetop.interop",
    "tunetop.tui", "tunetop.tui.widgets", "tunetop.tui.screens",
]
package-dir = {"tunetop" = "engine", "tunetop.tui" = "tui"}''')
    replace(py, '''[tool.setuptools.package-data]
tui = ["*.tcss"]''', '''[tool.setuptools.package-data]
"tunetop.tui" = ["*.tcss"]''')
    replace(py, '''tunetop = "engine.cli:main"''', '''tunetop = "tunetop.cli:main"''')
    replace(py, '''files = ["engine", "tui"]''', '''files = ["tunetop"]  # the alias of engine/, with tui/ inside it as the package has it''')
    replace(py, '''known-first-party = ["engine", "tui", "tests", "bench"]''', '''known-first-party = ["tunetop", "tests", "bench"]''')


if __name__ == "__main__":
    sys.exit(main())
