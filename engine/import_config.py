"""``tunetop import-config lora_config.yaml --output run.toml``: an mlx_lm.lora recipe as our TOML.

What mlx_lm.lora would train with the recipe, tunetop trains: every key the installed mlx-lm
accepts is mapped, or reported as one tunetop does not use (with the reason); unknown keys are
reported too. A key the recipe leaves out takes mlx_lm.lora's default, not tunetop's, read from
the installed mlx-lm at import time (``mlx_lm.lora.CONFIG_DEFAULTS``, its command-line defaults,
and the optimizer class's own defaults), and the import lists each default it filled where
tunetop's own differs. tests/test_import_config.py runs mlx_lm.lora's own argument handling on
the same recipes and compares what it would train with. The result is validated before it is
written.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # Read by mlx-lm's create_dataset (not in CONFIG_DEFAULTS; the defaults are tunetop's too).
    "text_feature": ("data", "text_feature"),
    "prompt_feature": ("data", "prompt_feature"),
    "completion_feature": ("data", "completion_feature"),
    "chat_feature": ("data", "chat_feature"),
}

NOT_USED = {
    "train": "a tunetop run always trains",
    "test": "run `tunetop test RUN` after training: the adapter's loss and perplexity on the test split",
    "test_batches": "see 'test'",
    "adapter_path": "adapters live in the run folder; `tunetop export` copies them anywhere",
    "resume_adapter_file": "use `tunetop train --resume RUN`, which also restores the optimizer",
    "config": "this file itself",
    "wandb": "an old mlx_lm.lora key: report_to: wandb is metrics.wandb",
}

# Keys of [optimizer] that stand for an optimizer class's argument of the same name.
EXPLICIT = {
    "adam": ("betas", "eps", "bias_correction"),
    "adamw": ("betas", "eps", "bias_correction", "weight_decay"),
    "sgd": ("momentum", "weight_decay"),
    "adafactor": (),
    "muon": (),
}


@dataclass
class Imported:
    """An imported recipe: our config as TOML-shaped data, the mlx-lm defaults filled in, notes."""

    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    filled: list[str] = field(default_factory=list)  # "section.key = value (mlx_lm.lora's ...)"
    notes: list[str] = field(default_factory=list)  # keys not carried over, and why

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value

    def fill(self, section: str, key: str, value: Any, why: str) -> None:
        """Put a default the recipe left out; listed when tunetop's own default differs."""
        self.put(section, key, value)
        ours = getattr(getattr(config_module.RunConfig(), section), key)
        if ours != value:
            self.filled.append(f"{section}.{key} = {value!r} ({why}; tunetop's own default is {ours!r})")


def mlx_lm_defaults() -> dict[str, Any]:
    """What mlx_lm.lora trains with for a key a config file leaves out, from the installed mlx-lm.

    As its ``main()`` merges them: command-line defaults that are not None win (a config file
    cannot change those), then the config file, then ``CONFIG_DEFAULTS``.
    """
    from mlx_lm import lora

    defaults = copy.deepcopy(lora.CONFIG_DEFAULTS)
    parsed = vars(lora.build_parser().parse_args([]))
    defaults.update({key: value for key, value in parsed.items() if value is not None})
    return defaults


def command_line_only() -> set[str]:
    """Keys whose command-line default is not None: mlx_lm.lora ignores them in a config file."""
    from mlx_lm import lora

    parsed = vars(lora.build_parser().parse_args([]))
    return {key for key, value in parsed.items() if value is not None}


def optimizer_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of mlx.optimizers' class for ``name`` (besides the learning rate)."""
    import mlx.optimizers as optim

    from .optimizers import CLASSES

    cls = getattr(optim, CLASSES[name])
    return {
        key: p.default
        for key, p in inspect.signature(cls.__init__).parameters.items()
        if key not in ("self", "learning_rate") and p.default is not inspect.Parameter.empty
    }


def _mlx_lm_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlx-lm")
    except Exception:  # not installed as a distribution: say so plainly
        return "(unknown version)"


def convert(raw: dict[str, Any], base: Path | None = None) -> Imported:
    """Map an mlx_lm.lora recipe (its YAML as a dict) to our config; ``base`` is the recipe's folder."""
    result = Imported()
    recipe = {key: value for key, value in raw.items() if value is not None}
    defaults = mlx_lm_defaults()
    effective = {**defaults, **recipe}

    # mlx_lm.lora's batch_size counts examples (packing would put more in each step), and it
    # computes LoRA products in float32: an imported recipe keeps both meanings.
    result.fill("data", "packing", "off", "mlx_lm.lora does not pack examples")
    result.fill("lora", "model_precision", False, "mlx_lm.lora computes LoRA products in float32")

    for key, (section, ours) in DIRECT.items():
        if key not in effective:
            continue
        value = effective[key]
        if key == "val_batches" and value == -1:
            value = 0  # mlx-lm's "all" is our 0
        if key == "optimizer":
            value = str(value).lower()
        if key in recipe:
            result.put(section, ours, value)
        else:
            result.fill(section, ours, value, f"mlx_lm.lora's default {key}: {effective[key]!r}")
    for key in sorted(command_line_only() & set(recipe)):
        if key in DIRECT:
            result.notes.append(f"{key}: carried over, but mlx_lm.lora {_mlx_lm_version()} reads it only from its "
                                "command line (a config file's value loses to the command-line default)")

    for key, holds in MAPPINGS.items():
        if key in recipe and not isinstance(recipe[key], dict):
            raise config_module.ConfigError(
                f"'{key}' must be a mapping ({holds}), got {type(recipe[key]).__name__} ({_shown(recipe[key])}). Fix that key."
            )
    _checked("hf_dataset", recipe, lambda: _data(effective, recipe, result, base))
    _checked("lora_parameters", recipe, lambda: _lora(effective, recipe, result))
    _checked("optimizer_config", recipe, lambda: _optimizer(effective, recipe, result))
    _checked("clear_cache_threshold", recipe, lambda: _cache(effective, recipe, result))
    if "lr_schedule" in recipe:
        result.notes.extend(_checked("lr_schedule", recipe, lambda: _schedule(recipe["lr_schedule"], result.put)))
        if "learning_rate" in recipe:
            result.notes.append("learning_rate: mlx_lm.lora starts from lr_schedule's first argument instead")

    _report(recipe, result)
    handled = set(DIRECT) | {
        "lora_parameters", "optimizer_config", "clear_cache_threshold", "lr_schedule", "hf_dataset", "report_to", "project_name"
    }
    for key in recipe:
        if key in handled:
            continue
        if key in NOT_USED:
            result.notes.append(f"{key}: {NOT_USED[key]}")
        else:
            result.notes.append(f"{key}: unknown to mlx_lm.lora {_mlx_lm_version()} and to tunetop; ignored")
    return result


# Keys whose value is a mapping in mlx_lm.lora's configs, and what it holds.
MAPPINGS = {
    "lora_parameters": "rank, scale, dropout, keys",
    "optimizer_config": "an optimizer's name -> its options",
    "lr_schedule": "name, arguments, warmup, warmup_init",
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _checked(key: str, recipe: dict[str, Any], step: Callable[[], Any]) -> Any:
    """Run one key's mapping; a value of the wrong kind inside it becomes an error naming the key."""
    try:
        return step()
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise config_module.ConfigError(
            f"'{key}' = {_shown(recipe.get(key))} is not what mlx_lm.lora takes there ({error}). Fix that key."
        ) from None


def _report(recipe: dict[str, Any], result: Imported) -> None:
    """report_to ("wandb", "swanlab" or both, comma-separated) and project_name -> [metrics]."""
    for name in str(recipe.get("report_to") or "").split(","):
        name = name.strip().lower()
        if name in ("wandb", "swanlab"):
            result.put("metrics", name, True)
        elif name:
            result.notes.append(f"report_to: {name!r} is neither wandb nor swanlab (mlx_lm.lora would stop there)")
    if recipe.get("project_name"):
        result.put("metrics", "project", str(recipe["project_name"]))


def _data(effective: dict[str, Any], recipe: dict[str, Any], result: Imported, base: Path | None) -> None:
    """hf_dataset entries, or a ``data`` that is no local folder: mlx_lm.lora loads it from the Hub."""
    if "hf_dataset" in recipe:
        given = recipe["hf_dataset"]
        entries = []
        for entry in given if isinstance(given, list) else [given]:
            kept = {key: value for key, value in dict(entry).items() if key in config_module.HF_DATASET_KEYS}
            for key in sorted(set(entry) - set(kept)):
                if key != "mask_prompt":  # mlx_lm.lora sets it from mask_prompt, as tunetop does
                    result.notes.append(f"hf_dataset.{key}: not a key of an hf_dataset entry; ignored")
            entries.append(kept)
        result.put("data", "hf_dataset", entries)
        return
    path = str(effective.get("data", ""))
    local = Path(path).expanduser().exists() or (base is not None and (base / path).exists())
    if path and not local and "/" in path and not path.startswith((".", "/", "~")):
        entry = {"path": path, "train_split": "train", "valid_split": "valid", "test_split": "test"}
        result.put("data", "hf_dataset", [entry])
        result.notes.append(f"data: {path!r} is no local folder, so mlx_lm.lora loads it from the Hugging Face Hub "
                            "with its splits train, valid and test: data.hf_dataset says the same")


def _lora(effective: dict[str, Any], recipe: dict[str, Any], result: Imported) -> None:
    """lora_parameters: a recipe's table replaces mlx-lm's default one whole."""
    given = dict(recipe.get("lora_parameters") or {})
    default = mlx_lm_defaults()["lora_parameters"]
    for name in ("rank", "scale", "dropout"):
        if name in given:
            result.put("lora", name, given[name])
        elif "lora_parameters" in recipe and effective.get("fine_tune_type", "lora") != "full":
            result.put("lora", name, default[name])
            result.notes.append(f"lora_parameters.{name}: missing, and mlx_lm.lora would stop with a KeyError; "
                                f"set to its default {default[name]!r}")
        else:
            result.fill("lora", name, default[name], f"mlx_lm.lora's default lora_parameters.{name}")
    if given.get("keys") is not None:
        result.put("lora", "keys", list(given["keys"]))
    extra = set(given) - {"rank", "scale", "dropout", "keys"}
    if extra:
        result.notes.append(f"lora_parameters: {', '.join(sorted(extra))} not used")


def _optimizer(effective: dict[str, Any], recipe: dict[str, Any], result: Imported) -> None:
    """The optimizer's arguments: the recipe's optimizer_config for it, then the class's defaults."""
    from .optimizers import CLASSES

    name = str(effective["optimizer"]).lower()
    if name not in CLASSES:
        result.notes.append(f"optimizer: {name!r} is not one of mlx_lm.lora's ({', '.join(CLASSES)})")
        return
    configs = effective.get("optimizer_config") or {}
    given = dict(configs.get(name) or {})
    for other, settings in configs.items():
        if other != name and settings:
            result.notes.append(f"optimizer_config.{other}: not used: the recipe trains with {name}")
    accepted = optimizer_defaults(name)
    options: dict[str, Any] = {}
    for key, value in given.items():
        if key not in accepted:
            result.notes.append(f"optimizer_config.{name}.{key}: not an argument of mlx.optimizers."
                                f"{CLASSES[name]} (mlx_lm.lora would stop with a TypeError); ignored")
        elif key in EXPLICIT[name]:
            result.put("optimizer", key, list(value) if key == "betas" else value)
        else:
            options[key] = list(value) if isinstance(value, tuple) else value
    why = f"mlx.optimizers.{CLASSES[name]}'s default"
    for key in EXPLICIT[name]:
        if key not in given:
            value = accepted[key]
            result.fill("optimizer", key, list(value) if key == "betas" else value, why)
    if name == "adafactor":  # tunetop's Adafactor follows the given learning rate unless told otherwise
        for key in ("relative_step", "scale_parameter"):
            if key not in given:
                options[key] = accepted[key]
                result.filled.append(f"optimizer.options.{key} = {accepted[key]!r} ({why}; tunetop's own is False)")
    if options:
        result.put("optimizer", "options", options)


def _cache(effective: dict[str, Any], recipe: dict[str, Any], result: Imported) -> None:
    """clear_cache_threshold (bytes, or a size such as "2GB") -> clear_cache_gb."""
    from mlx_lm.utils import _parse_size

    value = effective.get("clear_cache_threshold", 0)
    gb = (_parse_size(value) if isinstance(value, str) else float(value)) / 1e9
    if "clear_cache_threshold" in recipe:
        result.put("training", "clear_cache_gb", gb)
        if "clear_cache_threshold" in command_line_only():
            result.notes.append(f"clear_cache_threshold: carried over, but mlx_lm.lora {_mlx_lm_version()} reads it "
                                "only from its command line (from a config file it empties the cache every step)")
    else:
        result.fill("training", "clear_cache_gb", gb, f"mlx_lm.lora's default clear_cache_threshold: {value!r}")


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


def import_yaml(path: Path) -> tuple[config_module.RunConfig, Imported]:
    """Read an mlx_lm.lora YAML config and return our validated config and what the import did."""
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
            "options are plain values, lists and small mappings)."
        ) from None
    if not isinstance(raw, dict):
        raise config_module.ConfigError(f"{path}: expected a mapping of mlx_lm.lora options at the top level.")
    try:
        result = convert(raw, path.resolve().parent)
    except config_module.ConfigError as error:
        raise config_module.ConfigError(f"{path}: {error}") from None
    return config_module.from_dict(result.data, source=str(path)), result
