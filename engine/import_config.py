"""``tunetop import-config lora_config.yaml --output run.toml``: an mlx_lm.lora recipe as our TOML.

Every key mlx_lm.lora 0.32 accepts is mapped, or reported as one tunetop does not use (with
the reason); unknown keys are reported too. The result is validated before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as config_module
from .userfiles import not_a_regular_file

# mlx_lm.lora key -> (section, our key); values copied as they are.
DIRECT: dict[str, tuple[str, str]] = {
    "model": ("model", "path"),
    "data": ("data", "path"),
    "fine_tune_type": ("lora", "fine_tune_type"),
    "optimizer": ("optimizer", "name"),
    "mask_prompt": ("data", "mask_prompt"),
    "num_layers": ("lora", "num_layers"),
    "batch_size": ("training", "batch_size"),
    "iters": ("training", "iterations"),
    "val_batches": ("training", "validation_batches"),
    "learning_rate": ("optimizer", "learning_rate"),
    "steps_per_report": ("training", "steps_per_report"),
    "steps_per_eval": ("training", "steps_per_eval"),
    "save_every": ("checkpoints", "save_every"),
    "max_seq_length": ("data", "max_seq_length"),
    "grad_checkpoint": ("training", "grad_checkpoint"),
    "grad_accumulation_steps": ("training", "grad_accumulation_steps"),
    "seed": ("training", "seed"),
    "trust_remote_code": ("model", "trust_remote_code"),
}

NOT_USED = {
    "train": "a tunetop run always trains",
    "test": "run `tunetop test RUN` after training: the adapter's loss and perplexity on the test split",
    "test_batches": "see 'test'",
    "adapter_path": "adapters live in the run folder; `tunetop export` copies them anywhere",
    "resume_adapter_file": "use `tunetop train --resume RUN`, which also restores the optimizer",
    "report_to": "tunetop journals every event; `tunetop export-metrics` writes CSV or JSON lines",
    "project_name": "see 'report_to'",
    "config": "this file itself",
    "hf_dataset": "Hugging Face datasets cannot be fetched here; point data at a local folder",
    "wandb": "see 'report_to'",
}


def convert(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(our config as TOML-shaped data, notes on keys not carried over)."""
    out: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def put(section: str, key: str, value: Any) -> None:
        out.setdefault(section, {})[key] = value

    # mlx_lm.lora's batch_size counts examples; packing would put more examples in each step.
    # An imported recipe keeps its meaning; turning packing on is the user's choice.
    put("data", "packing", "off")

    for key, value in raw.items():
        if value is None:
            continue
        if key in MAPPINGS and not isinstance(value, dict):
            raise config_module.ConfigError(
                f"'{key}' must be a mapping ({MAPPINGS[key]}), got {type(value).__name__} ({value!r:.60})."
            )
        try:
            _convert_key(key, value, put, notes)
        except (TypeError, ValueError, AttributeError) as error:  # a nested value of the wrong kind
            raise config_module.ConfigError(
                f"'{key}' = {value!r:.80} is not what mlx_lm.lora takes there ({error}). Fix that key."
            ) from None
    return out, notes


# Keys whose value is a mapping in mlx_lm.lora's configs, and what it holds.
MAPPINGS = {
    "lora_parameters": "rank, scale, dropout, keys",
    "optimizer_config": "optimizer name -> its options",
    "lr_schedule": "name, arguments, warmup, warmup_init",
}


def _convert_key(key: str, value: Any, put: Any, notes: list[str]) -> None:
    """Carry one mlx_lm.lora key over with ``put``, or add a note on why it is not."""
    if key in DIRECT:
        section, ours = DIRECT[key]
        if key == "val_batches" and value == -1:
            value = 0  # mlx-lm's "all" is our 0
        if key == "optimizer":
            value = str(value).lower()
        put(section, ours, value)
    elif key == "lora_parameters":
        for name in ("rank", "scale", "dropout", "keys"):
            if name in value:
                put("lora", name, value[name])
        extra = set(value) - {"rank", "scale", "dropout", "keys"}
        if extra:
            notes.append(f"lora_parameters: {', '.join(sorted(extra))} not used")
    elif key == "optimizer_config":
        for name, options in (value or {}).items():
            for option, setting in (options or {}).items():
                if option in ("weight_decay", "momentum"):
                    put("optimizer", option, setting)
                else:
                    notes.append(f"optimizer_config.{name}.{option}: not used by tunetop")
    elif key == "lr_schedule":
        notes.extend(_schedule(value, put))
    elif key == "clear_cache_threshold":  # bytes in mlx-lm
        put("training", "clear_cache_gb", float(value) / 1e9)
    elif key in NOT_USED:
        notes.append(f"{key}: {NOT_USED[key]}")
    else:
        notes.append(f"{key}: unknown to mlx_lm.lora 0.32 and to tunetop; ignored")


def _schedule(value: dict[str, Any], put: Any) -> list[str]:
    """mlx-lm's {name, arguments, warmup, warmup_init} -> our [schedule]."""
    name = value.get("name")
    arguments = list(value.get("arguments") or [])
    if name == "cosine_decay":
        put("schedule", "name", "cosine")
        if arguments:
            put("optimizer", "learning_rate", arguments[0])
        if len(arguments) > 1:
            put("schedule", "decay_steps", int(arguments[1]))
        if len(arguments) > 2:
            put("schedule", "end_learning_rate", arguments[2])
    elif name == "linear_schedule":
        put("schedule", "name", "linear")
        if arguments:
            put("optimizer", "learning_rate", arguments[0])
        if len(arguments) > 1:
            put("schedule", "end_learning_rate", arguments[1])
        if len(arguments) > 2:
            put("schedule", "decay_steps", int(arguments[2]))
    else:
        return [f"lr_schedule: {name!r} is not supported (constant, linear_schedule, cosine_decay are)"]
    if value.get("warmup"):
        put("schedule", "warmup", int(value["warmup"]))
    if value.get("warmup_init") is not None:
        put("schedule", "warmup_init", value["warmup_init"])
    return []


def import_yaml(path: Path) -> tuple[config_module.RunConfig, list[str]]:
    """Read an mlx_lm.lora YAML config and return our validated config and the notes."""
    import yaml

    # mlx-lm's own loader reads 1e-5 as a number, as mlx_lm.lora does (plain YAML 1.1 would not).
    from mlx_lm.lora import yaml_loader as loader
    kind = not_a_regular_file(path)
    if kind:
        raise config_module.ConfigError(f"{path}: is {kind}, not a YAML file. Give the path of an mlx_lm.lora config.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise config_module.ConfigError(f"{path}: no such file.") from None
    except UnicodeDecodeError:
        raise config_module.ConfigError(f"{path}: not a UTF-8 text file; an mlx_lm.lora config is YAML text.") from None
    except OSError as error:
        raise config_module.ConfigError(f"{path}: cannot read it: {error.strerror}.") from None
    try:
        raw = yaml.load(text, Loader=loader) or {}
    except yaml.YAMLError as error:
        raise config_module.ConfigError(f"{path}: not valid YAML: {error}") from None
    except (RecursionError, ValueError):  # nesting too deep, an integer of thousands of digits
        raise config_module.ConfigError(
            f"{path}: holds a value nested too deeply or a number too long to read; fix it (mlx_lm.lora "
            "options are flat values, lists and small mappings)."
        ) from None
    if not isinstance(raw, dict):
        raise config_module.ConfigError(f"{path}: expected a mapping of mlx_lm.lora options at the top level.")
    try:
        data, notes = convert(raw)
    except config_module.ConfigError as error:
        raise config_module.ConfigError(f"{path}: {error}") from None
    return config_module.from_dict(data, source=str(path)), notes
