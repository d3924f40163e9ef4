"""LoRA, DoRA and full fine-tuning through mlx-lm's tuner, saved in mlx-lm's adapter layout.

An adapter directory holds ``adapters.safetensors`` (the trainable weights) and
``adapter_config.json`` (``fine_tune_type``, ``num_layers``, ``lora_parameters``), so
``mlx_lm.generate --adapter-path DIR`` and ``mlx_lm.fuse`` load it unchanged. Numbered
checkpoints (``0000100_adapters.safetensors``) sit beside it, as mlx-lm writes them. Every file
is written atomically: mlx-lm overwrites ``adapters.safetensors`` in place, and a crash then
leaves a torn file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters

from .atomic import write_atomic, write_text_atomic
from .config import ConfigError, LoRAConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_NUMBERED = re.compile(r"^(\d{7})_adapters\.safetensors$")


def lora_parameters(config: LoRAConfig) -> dict[str, Any]:
    """The ``lora_parameters`` block of mlx-lm's adapter config."""
    params: dict[str, Any] = {"rank": config.rank, "scale": config.scale, "dropout": config.dropout}
    if config.keys:
        params["keys"] = list(config.keys)
    return params


def adapter_config(config: LoRAConfig, model_path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content mlx-lm's loader and fuse expect."""
    out: dict[str, Any] = {
        "fine_tune_type": config.fine_tune_type,
        "num_layers": config.num_layers,
        "lora_parameters": lora_parameters(config),
        "model": model_path,
    }
    out.update(extra or {})
    return out


def describe_fine_tuning(model: nn.Module, model_path: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` of a model as it is adapted now, read from its layers.

    Works for models adapted by :func:`apply_fine_tuning` or by mlx-lm's ``linear_to_lora_layers``:
    LoRA (or DoRA) modules give the rank, scale, dropout and keys, the blocks that hold them give
    ``num_layers`` (counted from the last, as mlx-lm counts); without any, the blocks with trainable
    parameters make it a ``full`` fine-tune.
    """
    blocks = list(model.layers)  # type: ignore[attr-defined]
    found: dict[str, Any] = {}
    keys: set[str] = set()
    first = len(blocks)
    for number, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Module) and "lora_a" in module and "lora_b" in module:
                keys.add(name)
                first = min(first, number)
                found = found or {
                    "dora": "m" in module,
                    "rank": int(module.lora_a.shape[-2] if module.lora_a.ndim == 3 else module.lora_a.shape[-1]),
                    "scale": float(module.scale),
                    "dropout": round(1.0 - float(getattr(module.dropout, "_p_1", 1.0)), 6),
                }
    if found:
        out: dict[str, Any] = {
            "fine_tune_type": "dora" if found["dora"] else "lora",
            "num_layers": len(blocks) - first,
            "lora_parameters": {
                "rank": found["rank"], "scale": found["scale"], "dropout": found["dropout"], "keys": sorted(keys)
            },
        }
    else:
        trained = [n for n, block in enumerate(blocks) if tree_flatten(block.trainable_parameters())]
        out = {"fine_tune_type": "full", "num_layers": len(blocks) - min(trained, default=len(blocks))}
    if model_path:
        out["model"] = model_path
    return out


def apply_fine_tuning(model: nn.Module, config: LoRAConfig) -> None:
    """Freeze the base model and make the chosen parameters trainable, in place."""
    model.freeze()
    if config.fine_tune_type == "full":
        layers = model.layers if config.num_layers < 0 else model.layers[-config.num_layers :]  # type: ignore[attr-defined]
        for layer in layers:
            layer.unfreeze()
        return
    num_layers = len(model.layers) if config.num_layers < 0 else config.num_layers  # type: ignore[attr-defined]
    choices = adaptable_keys(model)
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters(config), use_dora=config.fine_tune_type == "dora")
    except ValueError as error:  # a key naming a module that is no linear layer ("self_attn")
        raise ConfigError(
            f"'lora.keys' = {config.keys}: {error}. Keys name linear layers inside a block; this model's are: "
            f"{', '.join(choices)}."
        ) from None
    if config.keys and count_parameters(model)[0] == 0:
        # mlx-lm adapts nothing and the first step fails deep inside mx.grad.
        raise ConfigError(
            f"'lora.keys' = {config.keys} names no module of this model, so nothing would train. Keys are "
            f"module paths inside a block; this model's are: {', '.join(choices)}. Use some of them, or [] "
            "for every linear layer."
        )
    if config.model_precision:
        from .lora_precision import use_model_precision

        use_model_precision(model)


def adaptable_keys(model: nn.Module) -> list[str]:
    """The module paths inside a block that ``lora.keys`` can name (the last block's linear layers)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return []
    block = layers[-1]
    return sorted(
        name for name, module in block.named_modules()
        if name and (hasattr(module, "to_lora") or isinstance(module, (nn.Linear, nn.QuantizedLinear)))
    )


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable parameters, flat, as saved in ``adapters.safetensors``."""
    return dict(tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameter counts.

    A quantized layer stores its weight packed into 32-bit words, plus a scale (and a bias) per
    group: it counts as the weights it stands for (``words x 32 / bits``), its scales and biases
    not at all, so a 4-bit 8B model counts 8B, not the 1.2B words that hold it.
    """
    sizes = {name: int(v.size) for name, v in tree_flatten(model.parameters())}  # type: ignore[misc,union-attr,str-unpack]
    for name, module in model.named_modules():
        bits = getattr(module, "bits", None)
        weight = module.get("weight") if isinstance(module, dict) else None
        if not isinstance(bits, int) or not isinstance(weight, mx.array) or weight.dtype != mx.uint32:
            continue
        prefix = f"{name}." if name else ""
        for part in ("weight", "scales", "biases"):
            sizes.pop(prefix + part, None)
        sizes[prefix + "weight"] = int(weight.size) * 32 // bits
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))  # type: ignore[misc,union-attr,str-unpack]
    return int(trainable), sum(sizes.values())


def _save_safetensors_atomic(path: Path, weights: dict[str, mx.array]) -> None:
    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    write_atomic(path, lambda temp: mx.save_safetensors(str(temp), weights))


def save_adapters(
    model: nn.Module, directory: str | Path, config_json: dict[str, Any], iteration: int | None = None
) -> Path:
    """Write the adapter (and a numbered copy when ``iteration`` is given); return the weights path."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # adapters are private to their owner
    weights = trainable_weights(model)
    mx.eval(weights)
    write_text_atomic(directory / ADAPTER_CONFIG, json.dumps(config_json, indent=2))
    if iteration is not None:
        _save_safetensors_atomic(directory / f"{iteration:07d}_adapters.safetensors", weights)
    target = directory / ADAPTER_WEIGHTS
    _save_safetensors_atomic(target, weights)
    return target


def numbered_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of numbered adapter checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NUMBERED.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_numbered(directory: str | Path, keep_last: int, keep: set[int] | None = None) -> list[tuple[int, Path]]:
    """Delete all but the newest ``keep_last`` numbered copies (0 keeps all), or with ``keep`` all but
    those iterations (the run's remaining full checkpoints); returns ``(iteration, path)`` of each deleted."""
    if keep_last <= 0:
        return []
    found = numbered_checkpoints(directory)
    doomed = found[:-keep_last] if keep is None else [(i, path) for i, path in found if i not in keep]
    for _iteration, path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply and load an adapter directory into ``model`` with mlx-lm's own loader."""
    return _mlx_lm_load_adapters(model, str(directory))
