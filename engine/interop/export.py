"""Take a run's results elsewhere: adapters for mlx-lm, a fused model, PEFT's layout, metrics.

``tunetop export RUN --format mlx|peft|fused --output DIR [--checkpoint ITERATION]`` and
``tunetop export-metrics RUN --format csv|jsonl [--output FILE]``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from tunetop.atomic import write_atomic, write_text_atomic
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir


class ExportError(ValueError):
    """An export that cannot be made; the message says why."""


def adapter_source(run: RunDir, checkpoint: int | None) -> tuple[Path, dict[str, Any]]:
    """(weights file, adapter config) of the latest adapter or a chosen checkpoint."""
    config_file = run.adapters / "adapter_config.json"
    if not config_file.exists():
        raise ExportError(f"run {run.id} has no adapter yet (no save has happened).")
    adapter_config = json.loads(config_file.read_text())
    if checkpoint is None:
        return run.adapters / "adapters.safetensors", adapter_config
    from tunetop.training.checkpoint import find_checkpoint

    try:
        folder = find_checkpoint(run.checkpoints, checkpoint)
    except Exception as error:
        raise ExportError(str(error)) from None
    return folder / "adapters.safetensors", adapter_config


def chosen_checkpoint(run: RunDir, checkpoint: int | str | None) -> int | None:
    """``--checkpoint``'s iteration: as given, or for ``best`` the iteration of the checkpoint with
    the lowest validation loss measured on its own weights (checkpoint.best_checkpoint)."""
    if checkpoint != "best":
        return checkpoint  # type: ignore[return-value]
    from tunetop.training.checkpoint import best_checkpoint, checkpoint_iteration

    best = best_checkpoint(run.checkpoints)
    if best is None:
        raise ExportError(
            f"run {run.id} has no checkpoint whose validation loss was measured on its own weights, so none is "
            "the best: a checkpoint counts when it was saved at an iteration that was validated (make "
            "checkpoints.save_every divide training.steps_per_eval). Pass --checkpoint ITERATION instead."
        )
    return checkpoint_iteration(best)


def saved_iteration(run: RunDir, checkpoint: int | None) -> int | None:
    """The iteration whose adapter ``adapter_source`` gives: the checkpoint's, or the latest save's.

    Every save writes the adapter, then the full checkpoint and the ``latest`` pointer, so the
    latest checkpoint names the iteration of ``adapters.safetensors``; a run without checkpoints
    (the library's ``train``) has the numbered adapter copies to go by.
    """
    if checkpoint is not None:
        return checkpoint
    from tunetop.training.adapters import numbered_checkpoints
    from tunetop.training.checkpoint import checkpoint_iteration, latest_checkpoint

    latest = latest_checkpoint(run.checkpoints)
    if latest is not None:
        return checkpoint_iteration(latest)
    saved = numbered_checkpoints(run.adapters)
    return saved[-1][0] if saved else None


def check_outside_run(run: RunDir, output: Path) -> None:
    """Refuse an output inside the run's own folder: an export copies the run's files, never over them
    (``--output`` on the run's adapters would overwrite the latest adapter with a checkpoint's)."""
    folder = run.path.resolve()
    target = output.resolve()
    if target == folder or folder in target.parents:
        raise ExportError(
            f"{output} is inside run {run.id}'s own folder ({run.path}); an export is a copy and never "
            "replaces the run's files. Choose a folder outside it."
        )


def check_output(output: Path, force: bool) -> None:
    """Refuse to write into a file, or into a folder that holds anything, unless ``force``."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} is a file; --output names the folder to export into. Choose another path.")
    if not output.is_dir():
        return
    links = sorted(p.name for p in output.iterdir() if p.is_symlink())
    if links:
        # An export writes files by name; through a link it would write wherever the link points
        # (another folder's files, or the run's own adapter).
        raise ExportError(
            f"{output} holds symbolic links ({', '.join(links[:5])}); an export never writes through a link. "
            "Remove them, or export into a new or empty folder."
        )
    if force:
        return
    entries = sorted(p.name for p in output.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ExportError(
            f"{output} is not empty (it holds {shown}); export into a new or empty folder, "
            "or pass --force to write into it (files of the same name are replaced)."
        )


def export_mlx(run: RunDir, output: Path, checkpoint: int | None = None) -> Path:
    """An adapter folder as mlx_lm.generate / fuse / server load it (``--adapter-path``)."""
    weights, adapter_config = adapter_source(run, checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: replaces whatever had the name, and never writes through it.
    def copy(temp: Path) -> None:
        shutil.copyfile(weights, temp)

    write_atomic(output / "adapters.safetensors", copy)
    write_text_atomic(output / "adapter_config.json", json.dumps(adapter_config, indent=2))
    return output


def export_fused(run: RunDir, output: Path, checkpoint: int | None = None) -> Path:
    """The base model with the adapter merged in, saved as a standalone model (mlx-lm's fuse)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load, save

    with_adapter = export_mlx(run, output / ".adapter", checkpoint)
    model_path = json.loads((with_adapter / "adapter_config.json").read_text()).get("model")
    if not model_path:
        raise ExportError("the adapter config does not name its base model; cannot fuse.")
    model, tokenizer, config = load(model_path, adapter_path=str(with_adapter), return_config=True)  # type: ignore[misc]
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    shutil.rmtree(with_adapter)
    save(output, model_path, model, tokenizer, config, donate_model=False)
    return output


def peft_key(mlx_key: str) -> str | None:
    """``model.layers.0.self_attn.q_proj.lora_a`` -> PEFT's ``...q_proj.lora_A.weight``."""
    for suffix, peft_suffix in ((".lora_a", ".lora_A.weight"), (".lora_b", ".lora_B.weight")):
        if mlx_key.endswith(suffix):
            return "base_model.model." + mlx_key[: -len(suffix)] + peft_suffix
    return None


def export_peft(run: RunDir, output: Path, checkpoint: int | None = None) -> Path:
    """Hugging Face PEFT's layout: lora_A/lora_B transposed, lora_alpha = scale x rank."""
    import mlx.core as mx
    import numpy as np
    from safetensors.numpy import save_file

    weights_file, adapter_config = adapter_source(run, checkpoint)
    if adapter_config.get("fine_tune_type", "lora") != "lora":
        raise ExportError(f"PEFT export is for LoRA adapters; this run is {adapter_config.get('fine_tune_type')}.")
    weights = mx.load(str(weights_file))
    tensors: dict[str, np.ndarray] = {}
    targets: set[str] = set()
    for key, value in weights.items():  # type: ignore[union-attr]
        name = peft_key(key)
        if name is None:
            raise ExportError(f"'{key}' is not a LoRA weight; PEFT export handles LoRA adapters only.")
        # mlx-lm keeps lora_a as (in, r) and lora_b as (r, out); PEFT wants (r, in) and (out, r).
        tensors[name] = np.ascontiguousarray(np.array(value.astype(mx.float32)).T)
        targets.add(key.rsplit(".", 2)[-2])
    params = adapter_config.get("lora_parameters", {})
    rank = int(params.get("rank", 8))
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(
        output / "adapter_model.safetensors", lambda temp: save_file(tensors, str(temp), metadata={"format": "pt"})
    )
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter_config.get("model", ""),
        "r": rank,
        "lora_alpha": float(params.get("scale", 10.0)) * rank,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    write_text_atomic(output / "adapter_config.json", json.dumps(peft_config, indent=2))
    return output


EXPORTERS = {"mlx": export_mlx, "fused": export_fused, "peft": export_peft}

METRIC_COLUMNS = ("seq", "ts", "type", "iteration", "loss", "learning_rate", "iterations_per_second",
                  "tokens_per_second", "trained_tokens", "peak_memory", "seconds")


def metrics(run: RunDir) -> list[dict[str, Any]]:
    """Training and validation rows of a run, from its journal (after the last resume's rewind)."""
    rows: list[dict[str, Any]] = []
    for event in read_events(run.journal):
        if event["type"] == "resumed":
            rows = [r for r in rows if r["iteration"] <= event["iteration"]]
        elif event["type"] in ("train", "validation"):
            rows.append({k: event[k] for k in METRIC_COLUMNS if k in event})
    return rows


def metrics_text(run: RunDir, fmt: str) -> str:
    rows = metrics(run)
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
