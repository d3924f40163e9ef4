"""Experiment trackers: Weights & Biases (``metrics.wandb``) and SwanLab (``metrics.swanlab``), as
mlx_lm.lora's ``report_to`` has them, through their optional libraries.

Each tracker is an EventLog subscriber: train and validation events are logged under mlx-lm's
own names (``train_loss``, ``learning_rate``, ``tokens_per_second``... and ``val_loss``,
``val_time``) at the iteration as step, so dashboards of mlx_lm.lora runs and tunetop runs
compare directly; the run's config is the tracker run's config. The libraries read their own
settings from the environment (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``SWANLAB_MODE``...).
A tracker that fails (no login, no network) becomes a warning and the run goes on: the journal is
the record, and ``tunetop export-metrics`` can always write the metrics again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

TRAIN = {
    "loss": "train_loss",
    "learning_rate": "learning_rate",
    "iterations_per_second": "iterations_per_second",
    "tokens_per_second": "tokens_per_second",
    "trained_tokens": "trained_tokens",
    "peak_memory": "peak_memory",
}
VALIDATION = {"loss": "val_loss", "seconds": "val_time"}
"""Journal event fields -> the keys mlx_lm.lora's callbacks log."""

INSTALL = {"wandb": "pip install 'tunetop[wandb]'", "swanlab": "pip install 'tunetop[swanlab]'"}
TITLE = {"wandb": "Weights & Biases", "swanlab": "SwanLab"}


def metrics_of(event: dict[str, Any]) -> dict[str, float] | None:
    """The values one journal event logs, under mlx-lm's names (with ``iteration``); None for others."""
    fields = {"train": TRAIN, "validation": VALIDATION}.get(event.get("type", ""))
    if fields is None:
        return None
    values = {name: event[key] for key, name in fields.items() if isinstance(event.get(key), (int, float))}
    return {"iteration": event.get("iteration", 0), **values}


class Tracker:
    """One started tracker run: logs metrics events; after a failure it says so once and stops."""

    def __init__(self, kind: str, run: Any, warn: Callable[[str], None]) -> None:
        self.kind = kind
        self.run = run
        self.warn = warn
        self.failed = False

    def on_event(self, event: dict[str, Any], _raw: bytes = b"") -> None:
        """An :class:`engine.events.EventLog` subscriber."""
        values = metrics_of(event)
        if values is None or self.failed:
            return
        try:
            self.run.log(values, step=int(values["iteration"]))
        except Exception as error:  # a tracker must never stop the training
            self.failed = True
            self.warn(f"{TITLE[self.kind]} stopped taking metrics ({type(error).__name__}: {error}); the journal "
                      "keeps them: `tunetop export-metrics` writes them out.")

    def close(self, exit_code: int = 0) -> None:
        with contextlib.suppress(Exception):
            if self.kind == "wandb":
                self.run.finish(exit_code=exit_code)
            else:
                self.run.finish()


def _start(kind: str, cfg: RunConfig, run_id: str, folder: Path) -> Any:
    """Start the tracker's run (ConfigError when its library is missing)."""
    try:
        module = __import__(kind)
    except ImportError:
        raise ConfigError(
            f"{cfg.source or 'config'}: metrics.{kind} needs the {kind} library: {INSTALL[kind]}."
        ) from None
    project = cfg.metrics.project or "tunetop"
    name = cfg.name or run_id
    if kind == "wandb":
        # The run id is the W&B id: a resumed run continues the same W&B run.
        return module.init(project=project, name=name, id=run_id, dir=str(folder), config=cfg.to_dict(),
                           resume="allow", settings=module.Settings(console="off"))
    return module.init(project=project, name=name, log_dir=str(folder / "swanlog"), config=cfg.to_dict(),
                       settings=module.Settings(terminal={"proxy_type": "none"}))


def open_trackers(cfg: RunConfig, run_id: str, folder: Path, warn: Callable[[str], None]) -> list[Tracker]:
    """The trackers ``[metrics]`` asks for, started; one that cannot start is a warning."""
    trackers = []
    for kind in ("wandb", "swanlab"):
        if not getattr(cfg.metrics, kind):
            continue
        try:
            run = _start(kind, cfg, run_id, folder)
        except ConfigError:
            raise
        except Exception as error:  # no login, no network...: the run trains without it
            warn(f"{TITLE[kind]} could not start ({type(error).__name__}: {error}); the run goes on without it. "
                 f"Log in, or set {'WANDB_MODE' if kind == 'wandb' else 'SWANLAB_MODE'}=offline to keep its files locally.")
            continue
        trackers.append(Tracker(kind, run, warn))
    return trackers
