"""The TOML run config: parse, validate into dataclasses, and write back.

No mlx import here: the TUI validates configs on machines without MLX.

A config has one table per concern (``model``, ``data``, ``lora``, ``training``,
``optimizer``, ``schedule``, ``checkpoints``) plus an optional top-level ``name`` and ``tags``.
Keys and defaults follow mlx-swift-lm's ``LoRATrain.Parameters`` and
``LoRAConfiguration`` in snake_case. Every error a user can make is reported as a
:class:`ConfigError` whose message names the file, the line when it can be found, the
key, what was expected and what was found.

Longer than most modules because it is one schema: every section's fields with their help,
and the checks that name the key. The live fields (LIVE_FIELDS, coerce_live) are the one rule
the engine and the TUI's form share.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, get_type_hints

import tomli_w

from tunetop.userfiles import not_a_regular_file

EMBEDDED = "@embedded"
"""Model or data path that means: the small default model and dataset tunetop builds offline."""
AUTO = "auto"
"""A setting tunetop works out for the run (``training.memory_budget_gb``)."""


class ConfigError(ValueError):
    """A config that cannot be used, with a message a person can act on."""


@dataclass
class ModelConfig:
    path: str = field(default=EMBEDDED, metadata={"help": "Hugging Face id, local directory, or @embedded"})
    revision: str = field(default="", metadata={"help": "Hub revision (branch, tag or commit); empty = default"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub"})


@dataclass
class DataConfig:
    path: str = field(default=EMBEDDED, metadata={"help": "Directory with train/valid/test .jsonl or .txt"})
    max_seq_length: int = field(default=2048, metadata={"help": "Longer sequences are truncated (warned once)"})
    mask_prompt: bool = field(default=False, metadata={"help": "Train on completions only (prompt/chat data)"})
    packing: str = field(default="auto", metadata={"help": "Several examples per row: auto (when rows hold 2+), on, off"})
    pack_length: int = field(default=0, metadata={"help": "Packed row width in tokens; 0 = the p95 length's power of two"})
    chat_template: str = field(
        default="", metadata={"help": "Chat template: a Jinja file, a tokenizer's template name, or the text; empty = the tokenizer's"}
    )
    text_feature: str = field(default="text", metadata={"help": "Row key of plain text"})
    prompt_feature: str = field(default="prompt", metadata={"help": "Row key of the prompt"})
    completion_feature: str = field(default="completion", metadata={"help": "Row key of the completion"})
    chat_feature: str = field(default="messages", metadata={"help": "Row key of chat messages"})
    hf_dataset: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Hugging Face datasets instead of data.path: [[data.hf_dataset]] path = \"owner/name\" (README, Data)"},
    )


@dataclass
class LoRAConfig:
    fine_tune_type: str = field(default="lora", metadata={"help": "lora, dora or full"})
    num_layers: int = field(default=16, metadata={"help": "Blocks to adapt, counted from the last; -1 = all"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    scale: float = field(default=10.0, metadata={"help": "LoRA scale (alpha / rank in PEFT terms)"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input"})
    keys: list[str] = field(default_factory=list, metadata={"help": "Module keys to adapt; empty = all linear"})
    model_precision: bool = field(
        default=True, metadata={"help": "LoRA products in the model's dtype (bf16/fp16); weights stay float32"}
    )


@dataclass
class TrainingConfig:
    batch_size: int = field(default=4, metadata={"help": "Examples per step"})
    iterations: int = field(default=1000, metadata={"help": "Optimizer steps"})
    steps_per_report: int = field(default=10, metadata={"help": "Report training loss every N steps"})
    steps_per_eval: int = field(default=100, metadata={"help": "Validate every N steps"})
    validation_batches: int = field(default=10, metadata={"help": "Batches per validation; 0 = all"})
    seed: int = field(default=0, metadata={"help": "Seeds the data order and mlx.random"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute activations to save memory"})
    grad_checkpoint_blocks: int = field(
        default=-1, metadata={"help": "With grad_checkpoint: blocks that recompute, from the first; -1 = all"}
    )
    grad_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step (their mean gradients averaged)"})
    on_nonfinite: str = field(default="pause", metadata={"help": "NaN/inf loss: pause, stop, or skip the batch"})
    early_stopping_patience: int = field(
        default=0, metadata={"help": "End the run after N validations without an improvement; 0 = off"}
    )
    early_stopping_min_delta: float = field(
        default=0.0, metadata={"help": "The validation loss must fall by more than this to count as an improvement"}
    )
    ce_chunk_tokens: int = field(default=0, metadata={"help": "Cross-entropy N positions at a time (saves logits memory); 0 = off"})
    clear_cache_gb: float = field(
        default=-1.0, metadata={"help": "Empty MLX's buffer cache after a step when it holds more GB; 0 = every step, -1 = never"}
    )
    memory_limit_gb: float = field(
        default=0.0, metadata={"help": "Soft cap: past it MLX waits for queued GPU work to finish; 0 = MLX's default"}
    )
    memory_budget_gb: float | str = field(
        default=AUTO,
        metadata={"help": "GB a step may use: picks memory_limit_gb, micro_batches, ce_chunk_tokens, grad_checkpoint_blocks "
                  "left at their defaults; auto = a safe share of the device, 0 = off"},
    )
    micro_batches: int = field(
        default=0, metadata={"help": "Passes a batch's rows take for one update (the same update, less memory); "
                             "0 = as memory_budget_gb picks, 1 = one pass"}
    )
    loss: str = field(
        default="", metadata={"help": "A custom loss, \"package.module:function\" or \"file.py:function\"; empty = the default"}
    )


@dataclass
class OptimizerConfig:
    name: str = field(default="adam", metadata={"help": "adam, adamw, sgd, adafactor or muon"})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "adamw and sgd only"})
    momentum: float = field(default=0.0, metadata={"help": "sgd only"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "adam and adamw only"})
    eps: float = field(default=1e-8, metadata={"help": "adam and adamw only"})
    bias_correction: bool = field(default=False, metadata={"help": "adam and adamw only"})
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Other arguments of the mlx.optimizers class (muon, adafactor, sgd's nesterov...)"}
    )


@dataclass
class ScheduleConfig:
    name: str = field(default="constant", metadata={"help": "constant, linear or cosine"})
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps before the schedule"})
    warmup_init: float = field(default=0.0, metadata={"help": "Learning rate at the start of warmup"})
    end_learning_rate: float = field(default=0.0, metadata={"help": "Final rate of linear and cosine"})
    decay_steps: int = field(default=0, metadata={"help": "Steps of decay after warmup; 0 = the rest of the run"})


@dataclass
class CheckpointConfig:
    save_every: int = field(default=100, metadata={"help": "Save adapter and checkpoint every N steps"})
    adapter_path: str = field(default="adapters", metadata={"help": "Adapter directory, relative to the run"})
    keep_last: int = field(default=3, metadata={"help": "Numbered checkpoints to keep; 0 = keep all"})


@dataclass
class SamplingConfig:
    sample_prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts to complete as training goes"})
    sample_every: int = field(default=0, metadata={"help": "Complete them every N steps; 0 = never"})
    max_tokens: int = field(default=64, metadata={"help": "Tokens to generate per sample"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})


@dataclass
class NotifyConfig:
    command: str = field(
        default="", metadata={"help": "Shell command run when the run ends or pauses on NaN, the event as JSON on stdin; empty = none"}
    )
    timeout: float = field(default=30.0, metadata={"help": "Seconds the command may take before it is killed"})


@dataclass
class MetricsConfig:
    tensorboard: bool = field(default=False, metadata={"help": "Also write TensorBoard event files to the run's tensorboard/ folder"})
    wandb: bool = field(default=False, metadata={"help": "Also report to Weights & Biases (pip install 'tunetop[wandb]')"})
    swanlab: bool = field(default=False, metadata={"help": "Also report to SwanLab (pip install 'tunetop[swanlab]')"})
    project: str = field(default="", metadata={"help": "The W&B / SwanLab project; empty = tunetop"})
    system_seconds: float = field(
        default=5.0,
        metadata={"help": "Sample CPU, memory and GPU every N seconds as `system` events (the dashboard's machine panel); 0 = off"},
    )


@dataclass
class RunConfig:
    """A whole run config. ``source`` is the file it came from, for messages."""

    name: str = ""
    tags: list[str] = field(default_factory=list)  # labels for finding runs again (a sweep's "sweep:ID")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    source: str = field(default="", compare=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain TOML-ready data (without ``source``)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        if not out["name"]:
            out.pop("name")
        if not out["tags"]:
            out.pop("tags")
        return out


# -- tags ---------------------------------------------------------------------------------

MAX_TAG_LENGTH = 40
MAX_TAGS = 32
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/=@+-]*")


def tag_problem(tag: object) -> str:
    """Why ``tag`` is no valid tag ("" when it is one): one rule for the config, the CLI, the TUI and the engine.

    Short labels (``lr-sweep``, ``sweep:20261129-1010``, ``baseline``): a letter or digit, then
    letters, digits and ``_ . : / = @ + -``; no spaces, so a list of them reads as words.
    """
    if not isinstance(tag, str):
        return f"a tag must be a string, got {_type_name(tag)} ({tag!r})"
    if not tag:
        return "a tag cannot be empty"
    if len(tag) > MAX_TAG_LENGTH:
        return f"tag '{tag[:MAX_TAG_LENGTH]}...' is {len(tag)} characters long; at most {MAX_TAG_LENGTH} are allowed"
    if not _TAG.fullmatch(tag):
        return (f"tag {tag!r} is not a short label: start with a letter or digit, then use letters, digits "
                "and _ . : / = @ + - (no spaces)")
    return ""


def check_tags(tags: object, where: str = "tags") -> list[str]:
    """A valid, duplicate-free list of tags in their order; ConfigError naming ``where`` otherwise."""
    if not isinstance(tags, list):
        raise ConfigError(f"{where}: 'tags' must be a list of short strings (tags = [\"baseline\", \"lr-sweep\"]), "
                          f"got {_type_name(tags)}.")
    for tag in tags:
        problem = tag_problem(tag)
        if problem:
            raise ConfigError(f"{where}: in 'tags', {problem}.")
    unique = list(dict.fromkeys(tags))
    if len(unique) > MAX_TAGS:
        raise ConfigError(f"{where}: 'tags' has {len(unique)} tags; a run takes at most {MAX_TAGS}.")
    return unique


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoRAConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "checkpoints": CheckpointConfig,
    "sampling": SamplingConfig,
    "metrics": MetricsConfig,
    "notify": NotifyConfig,
}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("lora", "fine_tune_type"): ("lora", "dora", "full"),
    ("optimizer", "name"): ("adam", "adamw", "sgd", "adafactor", "muon"),
    ("schedule", "name"): ("constant", "linear", "cosine"),
    ("training", "on_nonfinite"): ("pause", "stop", "skip"),
    ("data", "packing"): ("auto", "on", "off"),
}

# Keys that take AUTO or a number (the number within RANGES).
AUTO_OR_NUMBER = {("training", "memory_budget_gb")}

MAX_LEARNING_RATE = 10.0


def control_character(text: str, allowed: str = "") -> str:
    """The first control character of ``text`` (C0, DEL, C1) not in ``allowed``, as repr shows
    it; "" when there is none. Text that reaches a terminal (names, notes) must not carry escape
    sequences: a note with ESC]0;...BEL retitles the window of whoever lists the runs."""
    for char in text:
        if (ord(char) < 32 or 127 <= ord(char) < 160) and char not in allowed:
            return repr(char)
    return ""
"""The largest learning rate a config or a live ``set`` takes."""
_RATE_NOTE = "fine-tuning rates are about 1e-6 to 1e-2"
RANGE_NOTES: dict[tuple[str, str], str] = {
    ("optimizer", "learning_rate"): _RATE_NOTE,
    ("schedule", "warmup_init"): _RATE_NOTE,
    ("schedule", "end_learning_rate"): _RATE_NOTE,
}
"""Why a bound is where it is, said with the refusal."""

# (minimum, maximum) for numbers; None leaves that side open.
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("data", "max_seq_length"): (2, None),
    ("data", "pack_length"): (0, None),
    ("training", "ce_chunk_tokens"): (0, None),
    ("training", "clear_cache_gb"): (-1.0, None),
    ("training", "grad_checkpoint_blocks"): (-1, None),
    # MLX takes the cap in bytes as a 64-bit size: past ~1.8e10 GB it cannot be expressed at all,
    # and a million GB is already no cap on any machine.
    ("training", "memory_limit_gb"): (0.0, 1_000_000.0),
    ("training", "memory_budget_gb"): (0.0, 1_000_000.0),
    ("lora", "num_layers"): (-1, None),
    ("lora", "rank"): (1, None),
    ("lora", "dropout"): (0.0, 0.999),
    ("training", "batch_size"): (1, None),
    ("training", "iterations"): (1, None),
    ("training", "steps_per_report"): (1, None),
    ("training", "steps_per_eval"): (1, None),
    ("training", "validation_batches"): (0, None),
    ("training", "early_stopping_patience"): (0, None),
    ("training", "early_stopping_min_delta"): (0.0, None),
    ("notify", "timeout"): (0.1, 86_400.0),
    ("training", "seed"): (0, 2**32 - 1),
    ("training", "grad_accumulation_steps"): (1, None),
    ("training", "micro_batches"): (0, None),
    # Fine-tuning rates are 1e-6 to 1e-2; far past them a rate is a typo that ruins the weights
    # (a live `set learning_rate=1e9` was accepted and ruined the run's weights).
    ("optimizer", "learning_rate"): (0.0, MAX_LEARNING_RATE),
    ("optimizer", "weight_decay"): (0.0, None),
    ("optimizer", "momentum"): (0.0, 1.0),
    ("optimizer", "eps"): (0.0, None),
    ("schedule", "warmup"): (0, None),
    ("schedule", "warmup_init"): (0.0, MAX_LEARNING_RATE),
    ("schedule", "end_learning_rate"): (0.0, MAX_LEARNING_RATE),
    ("schedule", "decay_steps"): (0, None),
    ("checkpoints", "save_every"): (1, None),
    ("checkpoints", "keep_last"): (0, None),
    ("sampling", "sample_every"): (0, None),
    ("sampling", "max_tokens"): (1, 4096),
    ("sampling", "temperature"): (0.0, 10.0),
    ("metrics", "system_seconds"): (0.0, 86400.0),
}


def _where(source: str, line: int | None) -> str:
    if not source:
        return "config"
    return f"{source}:{line}" if line else source


def _find_line(text: str, section: str | None, key: str | None) -> int | None:
    """Best-effort line number of ``[section]`` or of ``key`` inside it, for messages."""
    if not text:
        return None
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
    assignment = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        m = header.match(line)
        if m:
            current = m.group(1)
            if key is None and current == section:
                return number
            continue
        m = assignment.match(line)
        if m and key is not None and m.group(1) == key and current == section:
            return number
    return None


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _option_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


HF_DATASET_KEYS = {
    "path": str, "config": dict, "train_split": str, "valid_split": str, "test_split": str,
    "text_feature": str, "prompt_feature": str, "completion_feature": str, "chat_feature": str,
}
"""The keys of a data.hf_dataset entry (mlx_lm.lora's hf_dataset entries) and their types."""


def _check_entry(full: str, number: int, entry: dict[str, Any], where: str) -> None:
    name = f"{full} entry {number}" if number else full
    for key, value in entry.items():
        if key not in HF_DATASET_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' in {name}.{_suggest(key, list(HF_DATASET_KEYS))} "
                              f"Its keys: {', '.join(HF_DATASET_KEYS)}.")
        if not isinstance(value, HF_DATASET_KEYS[key]):
            kind = "a table (load_dataset's keyword arguments)" if HF_DATASET_KEYS[key] is dict else "a string"
            raise ConfigError(f"{where}: '{key}' in {name} must be {kind}, got {_type_name(value)} ({value!r}).")
    if not entry.get("path"):
        raise ConfigError(f"{where}: {name} needs a 'path': a Hugging Face dataset id (owner/name) or a local folder.")


def _coerce(section: str, key: str, value: Any, expected: Any, where: str) -> Any:
    """Check ``value`` against the dataclass field type; ints are accepted for floats."""
    full = f"{section}.{key}"
    if (section, key) in AUTO_OR_NUMBER:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric:
            try:
                value = float(value)
                numeric = math.isfinite(value)
            except OverflowError:  # an integer of hundreds of digits
                numeric = False
        ok = numeric or value == AUTO
        want = f'"{AUTO}" or a number'
    elif expected is bool:
        ok = isinstance(value, bool)
        want = "true or false"
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
        if ok and abs(value) >= 2**63:  # no setting means anything there, and mlx and numpy cannot hold it
            ok, want = False, "an integer of at most 18 digits"
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a finite number"
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond float's range
                ok = False
            else:
                ok = math.isfinite(value)
    elif expected is str:
        ok = isinstance(value, str)
        want = "a string"
    elif expected == list[float]:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        want = "a list of numbers"
        if ok:
            try:
                value = [float(v) for v in value]
            except OverflowError:  # an integer beyond float's range
                ok = False
    elif expected == list[dict[str, Any]]:
        if isinstance(value, dict):  # one [data.hf_dataset] table, or an array of them
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
        want = "a table or an array of tables"
        if ok:
            for number, entry in enumerate(value, start=1):
                _check_entry(full, number if len(value) > 1 else 0, entry, where)
    elif expected == dict[str, Any]:
        ok = isinstance(value, dict) and all(_option_value(v) for v in value.values())
        want = "a table of numbers, booleans, strings or lists of numbers"
    else:  # list[str]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        want = "a list of strings"
    if not ok:
        raise ConfigError(
            f"{where}: '{full}' must be {want}, got {_type_name(value)} ({_shown(value)}). "
            f"Fix the value of '{key}' in the [{section}] table."
        )
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(
            f"{where}: '{full}' must be one of {', '.join(choices)}, got {value!r}."
            f"{_suggest(str(value), list(choices))}"
        )
    bounds = RANGES.get((section, key))
    if bounds and not isinstance(value, str):
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            span = (
                f"at least {low}"
                if high is None
                else f"at most {high}"
                if low is None
                else f"between {low} and {high}"
            )
            note = f" ({RANGE_NOTES[section, key]})" if (section, key) in RANGE_NOTES else ""
            raise ConfigError(f"{where}: '{full}' must be {span}, got {_shown(value)}{note}.")
    return value


def _first_line(text: str, pattern: re.Pattern[str]) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.search(line):
            return number
    return None


def _deep_line(text: str, limit: int = 64) -> int | None:
    """The line where brackets first nest ``limit`` deep (a rough count that ignores strings)."""
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        for char in line:
            depth += 1 if char in "[{" else -1 if char in "]}" else 0
            if depth >= limit:
                return number
    return None


def parse(text: str, source: str = "") -> RunConfig:
    """Validate TOML text into a :class:`RunConfig`; raise :class:`ConfigError` on any mistake."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(
            f"{source or 'config'}: not valid TOML: {error}. Check the quoting and brackets on that line."
        ) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        where = _where(source, _deep_line(text))
        raise ConfigError(
            f"{where}: arrays or inline tables are nested too deeply to read. No setting takes more than "
            "a flat list of strings: fix the brackets on that line."
        ) from None
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        where = _where(source, _first_line(text, re.compile(r"\d[\d_]{4000,}")))
        raise ConfigError(
            f"{where}: a number with thousands of digits. No setting takes a value that large: "
            "fix the number on that line."
        ) from None
    return from_dict(raw, source=source, text=text)


def from_dict(raw: dict[str, Any], source: str = "", text: str = "") -> RunConfig:
    """Validate already-parsed TOML data (as from ``tomllib``) into a :class:`RunConfig`."""
    config = RunConfig(source=source)
    allowed_top = ["name", "tags", *SECTIONS]
    for top, value in raw.items():
        if top == "tags":
            config.tags = check_tags(value, _where(source, _find_line(text, None, "tags")))
            continue
        if top == "name":
            if not isinstance(value, str):
                raise ConfigError(
                    f"{_where(source, _find_line(text, None, 'name'))}: 'name' must be a string, "
                    f"got {_type_name(value)}."
                )
            if bad := control_character(value):
                raise ConfigError(
                    f"{_where(source, _find_line(text, None, 'name'))}: 'name' holds the control character {bad}, "
                    "which would reach terminals as a command (ls, the TUI); use printable text."
                )
            config.name = value
            continue
        if top not in SECTIONS:
            line = _find_line(text, top, None) or _find_line(text, None, top)
            raise ConfigError(
                f"{_where(source, line)}: unknown table or key '{top}'.{_suggest(top, allowed_top)} "
                f"Valid top-level names are: {', '.join(allowed_top)}."
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{_where(source, _find_line(text, None, top))}: '{top}' must be a table "
                f"(a [{top}] header followed by keys), got {_type_name(value)}."
            )
        cls = SECTIONS[top]
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        section_obj = getattr(config, top)
        for key, item in value.items():
            where = _where(source, _find_line(text, top, key))
            if key not in names:
                raise ConfigError(
                    f"{where}: unknown key '{top}.{key}'.{_suggest(key, names)} "
                    f"Valid keys in [{top}] are: {', '.join(names)}."
                )
            setattr(section_obj, key, _coerce(top, key, item, hints[key], where))
    _check_consistency(config, text)
    return config


def _check_optimizer(config: RunConfig, text: str) -> None:
    """Each optimizer key applies to the optimizers that have it; a key another one would
    silently ignore is an error (weight_decay and momentum keep their old leniency for adam)."""
    o, source = config.optimizer, config.source
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"{_where(source, _find_line(text, 'optimizer', 'betas'))}: 'optimizer.betas' must be "
                          f"two numbers in [0, 1), got {o.betas!r}.")
    adam = OptimizerConfig()
    for key, applies in (("betas", ("adam", "adamw")), ("eps", ("adam", "adamw")), ("bias_correction", ("adam", "adamw")),
                         ("weight_decay", ("adam", "adamw", "sgd")), ("momentum", ("adam", "adamw", "sgd"))):
        if o.name not in applies and getattr(o, key) != getattr(adam, key):
            raise ConfigError(
                f"{_where(source, _find_line(text, 'optimizer', key))}: 'optimizer.{key}' does not apply to "
                f"{o.name}. Set {o.name}'s arguments in optimizer.options (e.g. options = {{ {key} = ... }})."
            )
    if "learning_rate" in o.options:
        raise ConfigError(f"{_where(source, _find_line(text, 'optimizer', 'options'))}: set the learning rate as "
                          "optimizer.learning_rate, not in optimizer.options.")


def _check_consistency(config: RunConfig, text: str) -> None:
    source = config.source
    _check_optimizer(config, text)
    if config.training.grad_accumulation_steps > 1 and config.training.batch_size < 1:
        raise ConfigError(f"{_where(source, None)}: batch_size must be at least 1.")
    if 0 < config.metrics.system_seconds < 1:  # a sample per step or more would fill the journal with machine readings
        line = _find_line(text, "metrics", "system_seconds")
        raise ConfigError(f"{_where(source, line)}: 'metrics.system_seconds' must be at least 1 (seconds between "
                          f"samples of the machine), or 0 to turn sampling off; got {config.metrics.system_seconds:g}.")
    if not config.model.path:
        line = _find_line(text, "model", "path")
        raise ConfigError(
            f"{_where(source, line)}: 'model.path' is empty. Give a Hugging Face id, a local model "
            f"directory, or {EMBEDDED!r} for the built-in small model."
        )
    if not config.data.path:
        line = _find_line(text, "data", "path")
        raise ConfigError(
            f"{_where(source, line)}: 'data.path' is empty. Give a directory holding train and valid "
            f"files, or {EMBEDDED!r} for the built-in dataset."
        )
    problem = adapter_path_problem(config.checkpoints.adapter_path)
    if problem:
        line = _find_line(text, "checkpoints", "adapter_path")
        raise ConfigError(
            f"{_where(source, line)}: 'checkpoints.adapter_path' = {config.checkpoints.adapter_path!r} {problem}. "
            "It names a folder inside the run folder (default 'adapters'); to put an adapter anywhere "
            "else, use `tunetop export RUN --format mlx --output DIR`."
        )


def adapter_path_problem(value: str) -> str:
    """Why ``checkpoints.adapter_path`` cannot be used ("" when it can).

    The engine writes and prunes adapter files there, so it must stay inside the run folder:
    an absolute path or a ``..`` once wrote (and with ``keep_last`` deleted) another folder's
    files. Under ``checkpoints/`` checkpoint retention would delete the adapter. One rule for
    the config load, the TUI editor and :attr:`tunetop.runs.folders.RunDir.adapters`.
    """
    if not value.strip():
        return "is empty"
    if "\x00" in value:
        return "holds a NUL character"
    if value.startswith("~"):
        return "starts with '~', which is not expanded: it is a path relative to the run folder"
    path = PurePosixPath(value)
    if path.is_absolute():
        return "is an absolute path, outside the run folder"
    if ".." in path.parts:
        return "climbs out of the run folder with '..'"
    if not path.parts:
        return "is the run folder itself, where the run's own files live"
    if path.parts[0] == "checkpoints":
        return "is inside the run's checkpoints/ folder, which checkpoint retention prunes"
    first = path.parts[0]
    if first in _RUN_FILES or first.startswith(("journal.", "history.", "engine.")) or re.fullmatch(r"rank\d+\.log", first):
        return f"names {first!r}, one of the run's own files, which the adapter would overwrite"
    return ""


# Names the engine keeps in a run folder (runs/folders.py, control/journal.py, control/history.py, runs/engine.py).
_RUN_FILES = frozenset({"config.toml", "status.json", "endpoints.json", "lock", "tensorboard", "wandb", "swanlog"})


def load(path: str | Path) -> RunConfig:
    """Read and validate a config file. Relative data and model paths resolve against its folder."""
    path = Path(path)
    kind = not_a_regular_file(path)
    if kind:
        raise ConfigError(f"{path}: is {kind}, not a config file. Give the path of a TOML file (`tunetop init` writes one).")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file. Create one with `tunetop init {path}`.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a run config is TOML text.") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config: {error.strerror}.") from None
    config = parse(text, source=str(path))
    base = path.resolve().parent
    for section in (config.model, config.data):
        if section.path != EMBEDDED and not Path(section.path).is_absolute():
            candidate = base / section.path
            if candidate.exists():
                section.path = str(candidate)
    module, _, function = config.training.loss.rpartition(":")
    if module.endswith(".py") and not Path(module).is_absolute() and (base / module).is_file():
        config.training.loss = f"{base / module}:{function}"
    for entry in config.data.hf_dataset:  # a local dataset folder next to the config
        local = Path(entry["path"]).expanduser()
        if not local.is_absolute() and (base / local).exists():
            entry["path"] = str(base / local)
    template = config.data.chat_template
    if template and "{" not in template and not Path(template).is_absolute() and (base / template).is_file():
        config.data.chat_template = str(base / template)
    return config


def place_error(message: str, source: str) -> str:
    """A config error found after validation (the engine's checks: the optimizer's arguments, the
    loss, packing, the memory plan), named at ``source`` and at the line of the first key it
    mentions that the file sets, as :func:`parse` names its own errors."""
    if not source:
        return message
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    line = None
    for match in re.finditer(r"\b(?:" + "|".join(SECTIONS) + r")(?:\.[A-Za-z0-9_]+)+", message):
        parts = match.group(0).split(".")
        # optimizer.options.x: the key x of [optimizer.options], else options of [optimizer]
        for cut in range(len(parts) - 1, 0, -1):
            line = _find_line(text, ".".join(parts[:cut]), parts[cut])
            if line:
                break
        if line:
            break
    where = _where(source, line)
    if message.startswith(f"{source}: "):
        return f"{where}: {message[len(source) + 2:]}"
    if source in message:
        return message.replace(source, where, 1)
    return f"{where}: {message}"


def check_ranks(cfg: RunConfig, ranks: int) -> None:
    """The batch size is global: it must split evenly over the ranks (ConfigError otherwise)."""
    if ranks > 1 and cfg.training.batch_size % ranks:
        raise ConfigError(
            f"training.batch_size = {cfg.training.batch_size} in {cfg.source or 'the config'} does not split over "
            f"{ranks} ranks; the batch size is global: make it a multiple of the number of ranks (--np or --hosts)."
        )


def check_paths(config: RunConfig) -> None:
    """Fail early, naming the key, when a local data directory does not exist."""
    if config.data.hf_dataset:
        return  # data.path is not used; the datasets library says what it cannot load
    if config.data.path != EMBEDDED and not Path(config.data.path).is_dir():
        raise ConfigError(
            f"{_where(config.source, None)}: 'data.path' = {config.data.path!r} is not a directory. "
            "Point it at a folder holding train.jsonl (or train.txt) and valid.jsonl."
        )


def dumps(config: RunConfig) -> str:
    """The config as TOML text (tomli-w)."""
    return tomli_w.dumps(config.to_dict())


def save(config: RunConfig, path: str | Path) -> None:
    """Write the config as TOML."""
    Path(path).write_text(dumps(config), encoding="utf-8")


def starter_text() -> str:
    """A commented starter config; as written it trains the embedded default offline."""
    lines = [
        "# tunetop run config. Every key is optional; the values shown are the defaults,",
        "# except where a comment says the starter changed one so the embedded demo learns fast.",
        "# Reference: README.md, 'Config reference'.",
        "",
        'name = "starter"',
        "tags = []                            # short labels shown in the runs list (`tunetop tag` changes them)",
        "",
    ]
    starter_overrides: dict[tuple[str, str], Any] = {
        ("training", "iterations"): 300,
        ("training", "steps_per_eval"): 50,
        ("training", "batch_size"): 8,
        ("optimizer", "learning_rate"): 5e-4,
        ("lora", "scale"): 20.0,
        ("data", "mask_prompt"): True,
    }
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            value = starter_overrides.get((section, f.name), default)
            # An empty table must stay inline: tomli-w would write a [header] for it.
            rendered = f"{f.name} = {{}}" if value == {} else tomli_w.dumps({f.name: value}).strip()
            if isinstance(value, list) and value:  # one line, so the comment sits beside it
                items = ", ".join(tomli_w.dumps({"v": item}).strip()[4:] for item in value)
                rendered = f"{f.name} = [{items}]"
            note = f.metadata.get("help", "")
            if (section, f.name) in starter_overrides:
                note += f" (default {default!r}; starter value for the embedded demo)"
            lines.append(f"{rendered:<36} # {note}")
        lines.append("")
    return "\n".join(lines)


LIVE_FIELDS: dict[str, tuple[str, str]] = {
    "learning_rate": ("optimizer", "learning_rate"),
    "steps_per_report": ("training", "steps_per_report"),
    "steps_per_eval": ("training", "steps_per_eval"),
    "save_every": ("checkpoints", "save_every"),
    "validation_batches": ("training", "validation_batches"),
    "memory_limit_gb": ("training", "memory_limit_gb"),
    "early_stopping_patience": ("training", "early_stopping_patience"),
    "early_stopping_min_delta": ("training", "early_stopping_min_delta"),
}
"""Fields a running engine accepts through the ``set`` command, and where they live."""

# What changes how a run is watched, saved or fitted in memory, not what it computes: a resume
# with other values here is still exact.
WATCH_ONLY_SECTIONS = ("checkpoints", "sampling", "metrics", "notify")
WATCH_ONLY_KEYS = {
    ("training", "steps_per_report"),
    ("training", "steps_per_eval"),
    ("training", "validation_batches"),
    ("training", "on_nonfinite"),
    ("training", "memory_limit_gb"),
    ("training", "clear_cache_gb"),
    ("training", "memory_budget_gb"),
    ("training", "early_stopping_patience"),  # when the run ends, not what a step computes
    ("training", "early_stopping_min_delta"),
}


def computation_values(cfg: RunConfig) -> dict[str, Any]:
    """The config values that decide what training computes, as ``{"section.key": value}``.

    Every checkpoint keeps them; a resume under a config that differs in one of them is not
    exact, and the engine says which keys changed (:func:`changed_values`).
    """
    values: dict[str, Any] = {}
    for section, kind in SECTIONS.items():
        if section in WATCH_ONLY_SECTIONS:
            continue
        part = getattr(cfg, section)
        for item in dataclasses.fields(kind):
            if (section, item.name) not in WATCH_ONLY_KEYS:
                values[f"{section}.{item.name}"] = getattr(part, item.name)
    return values


def changed_values(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key whose value differs; a key one side lacks shows as unset.

    A key ``before`` lacks (a checkpoint of a version without it) that holds its default computes
    as before it existed, so it is no change.
    """
    defaults = computation_values(RunConfig())
    return [
        f"{key}: {before.get(key, 'unset')!r} -> {after.get(key, 'unset')!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, "unset") != after.get(key, "unset")
        and not (key not in before and after.get(key) == defaults.get(key, "unset"))
    ]


def coerce_field(section: str, name: str, value: Any, where: str) -> Any:
    """Check one value against ``[section] name``'s declared type, choices and range."""
    expected = get_type_hints(SECTIONS[section])[name]
    return _coerce(section, name, value, expected, where)


MAX_LIVE_TEXT = 100
"""Characters a live value given as text may have: every live field's value fits in far fewer."""


def coerce_live(key: str, value: Any) -> Any:
    """Validate one live change (``set KEY=VALUE``) with the same rules as the file.

    The one rule for the TUI's form and the engine's ``set``: any value at all gives the
    coerced value or a :class:`ConfigError` saying what the field takes, and the engine
    stores nothing before every value of a ``set`` has passed here.
    """
    if not isinstance(key, str) or key not in LIVE_FIELDS:
        shown = _shown(key)
        raise ConfigError(
            f"{shown} cannot be changed while a run trains.{_suggest(str(key), list(LIVE_FIELDS))} "
            f"Live-editable fields: {', '.join(LIVE_FIELDS)}."
        )
    section, name = LIVE_FIELDS[key]
    expected = get_type_hints(SECTIONS[section])[name]
    help_text = next(f.metadata.get("help", "") for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    takes = f"{key} takes {'an integer' if expected is int else 'a number'}: {help_text}."
    if isinstance(value, str):
        if len(value) > MAX_LIVE_TEXT:
            raise ConfigError(f"'{key}': a value of {len(value)} characters is not a value for it. {takes}")
        try:
            document = tomllib.loads(f"v = {value}")
        except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # ValueError: integers past 4,300 digits
            raise ConfigError(f"'{key}': {_shown(value)} is not a value (expected {expected.__name__}). {takes}") from None
        if set(document) != {"v"}:  # "2e-4\nsave_every = 1": one value, not a TOML document
            raise ConfigError(f"'{key}': {_shown(value)} holds more than one value. {takes}")
        value = document["v"]
    try:
        return coerce_field(section, name, value, "set")
    except ConfigError as error:
        raise ConfigError(f"{_shorten(str(error))} {takes}") from None


def _shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it, cut short: it does not reprint a huge one."""
    try:
        text = f"'{value}'" if isinstance(value, str) else repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a list nested too deep
        return f"a {type(value).__name__} too large to print"
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _shorten(message: str, limit: int = 400) -> str:
    """A message quoting a huge value (a 60 KB string sent to ``set``) cut to a readable size."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
