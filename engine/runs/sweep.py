"""Sweeps: one config and ``--set KEY=V1,V2,...`` axes become one validated config per combination.

Pure logic, no I/O: ``tunetop sweep`` (tunetop.cli.queue) queues what :func:`expand` returns.
Every value is checked on its own first (an error names the key and the value), then every
combination (keys that must agree, such as an optimizer's own options), all before anything is
queued. Each run is named by its values (``NAME-lr3e-5-r16``, the values as typed) and tagged
``sweep:ID``, which ``tunetop compare`` ranks. No mlx import here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import secrets
import tomllib
from dataclasses import dataclass
from typing import Any

from tunetop.training import config as config_module
from tunetop.training.config import SECTIONS, ConfigError, RunConfig

MAX_RUNS = 1000
"""The most runs one sweep queues (a grid larger than this needs --random N)."""

SHORT_NAMES = {
    "learning_rate": "lr", "rank": "r", "batch_size": "bs", "iterations": "it", "weight_decay": "wd",
    "dropout": "do", "scale": "s", "num_layers": "nl", "warmup": "wu", "max_seq_length": "len",
    "grad_accumulation_steps": "ga", "momentum": "mom", "fine_tune_type": "ft", "end_learning_rate": "endlr",
}
"""How a swept key shows in run names; other keys show as their own name."""


class SweepError(ValueError):
    """A sweep that cannot be queued; the message names the --set, the key and the value."""


@dataclass
class Axis:
    """One ``--set``: a config key and its values, with each value's text as typed."""

    section: str
    key: str
    values: list[Any]
    texts: list[str]

    @property
    def full(self) -> str:
        return f"{self.section}.{self.key}"


@dataclass
class Combination:
    """One run of a sweep: its config (named and tagged) and the values it was given."""

    config: RunConfig
    values: dict[str, Any]


def split_values(text: str) -> list[str]:
    """``1e-5,3e-5`` -> items; commas inside brackets or quotes belong to their item (``["q","v"],["o"]``)."""
    items, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += char
    items.append(current.strip())
    return items


def _value(text: str) -> Any:
    """A value as TOML reads it (``1e-5``, ``16``, ``true``, ``"x"``, ``["a"]``); else the bare text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return text


def parse_axis(spec: str) -> Axis:
    """``section.key=V1,V2,...`` as an Axis; SweepError for a key that is no config key."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise SweepError(f"--set {spec!r} is not KEY=V1,V2,... (for example --set optimizer.learning_rate=1e-5,3e-5).")
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        near = config_module._suggest(section, list(SECTIONS))
        raise SweepError(f"--set {key}: a sweep sets keys of a table as SECTION.KEY (optimizer.learning_rate, "
                         f"lora.rank);{near} tables: {', '.join(SECTIONS)}.")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        raise SweepError(f"--set {key}: unknown key '{key}'.{config_module._suggest(name, names)} "
                         f"Keys of [{section}]: {', '.join(names)}.")
    texts = split_values(values)
    if any(not t for t in texts):
        raise SweepError(f"--set {spec}: an empty value; give the values separated by commas, no empty one.")
    if len(set(texts)) != len(texts):
        raise SweepError(f"--set {spec}: a value is given twice; each must differ.")
    return Axis(section, name, [_value(t) for t in texts], texts)


def _apply(base: dict[str, Any], settings: list[tuple[Axis, int]]) -> RunConfig:
    raw = copy.deepcopy(base)
    for axis, index in settings:
        raw.setdefault(axis.section, {})[axis.key] = axis.values[index]
    return config_module.from_dict(raw)


def _message(error: ConfigError) -> str:
    return str(error).removeprefix("config: ")


def label(axes: list[Axis]) -> list[str]:
    """Each axis's label in run names: its short name, the key where two short names clash."""
    short = [SHORT_NAMES.get(a.key, a.key) for a in axes]
    return [s if short.count(s) == 1 else a.full.replace(".", "_") for s, a in zip(short, axes, strict=True)]


def _name_part(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9.+_-]+", "_", text.strip().strip("\"'")).strip("_")
    return cleaned or "x"


def expand(base: RunConfig, axes: list[Axis], sample: int = 0, seed: int = 0, sweep_id: str = "") -> list[Combination]:
    """Every combination of ``axes`` on ``base`` (or ``sample`` of them, drawn with ``seed``), each
    validated, named ``base.name-label value-...`` and tagged ``sweep:ID``; SweepError before any
    is returned when one value or combination is not a valid config."""
    if not axes:
        raise SweepError("a sweep needs at least one --set KEY=V1,V2,... to vary.")
    seen = [a.full for a in axes]
    twice = next((k for k in seen if seen.count(k) > 1), None)
    if twice:
        raise SweepError(f"--set {twice} is given twice; give all its values in one --set.")
    raw = base.to_dict()
    for axis in axes:  # each value alone, so the error names exactly one
        for index, text in enumerate(axis.texts):
            try:
                _apply(raw, [(axis, index)])
            except ConfigError as error:
                raise SweepError(f"--set {axis.full}={text}: {_message(error)}") from None
    total = math.prod(len(a.values) for a in axes)
    if sample:
        if not 1 <= sample <= min(total, MAX_RUNS):
            raise SweepError(f"--random {sample}: the grid has {total} combinations; draw between 1 and {min(total, MAX_RUNS)}.")
        picks = sorted(random.Random(seed).sample(range(total), sample))
    else:
        if total > MAX_RUNS:
            raise SweepError(f"the grid has {total} combinations, more than {MAX_RUNS}; "
                             "draw some with --random N (--seed S to choose which).")
        picks = list(range(total))
    labels = label(axes)
    tag = f"sweep:{sweep_id or new_sweep_id()}"
    out = []
    for pick in picks:
        settings, rest = [], pick
        for axis in reversed(axes):  # the last --set varies fastest, as nested loops would
            rest, index = divmod(rest, len(axis.values))
            settings.append((axis, index))
        settings.reverse()
        described = ", ".join(f"{a.full}={a.texts[i]}" for a, i in settings)
        try:
            cfg = _apply(raw, settings)
        except ConfigError as error:
            raise SweepError(f"the combination {described}: {_message(error)}") from None
        suffix = "-".join(f"{lab}{_name_part(a.texts[i])}" for lab, (a, i) in zip(labels, settings, strict=True))
        cfg.name = f"{base.name}-{suffix}" if base.name else suffix
        cfg.tags = [*(t for t in base.tags if t != tag), tag]
        out.append(Combination(cfg, {a.full: a.values[i] for a, i in settings}))
    return out


def new_sweep_id() -> str:
    """Six hex digits: short to type (``tunetop compare ID``), unique enough for one person's sweeps."""
    return secrets.token_hex(3)
