"""Exports (mlx adapter, fused model, PEFT layout, metrics) and importing mlx_lm.lora configs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import tunetop, write_config
from tests.numerics import forward_rtol
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir, list_runs

TOKENS = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])


@pytest.fixture
def trained_run(tmp_path: Path) -> RunDir:
    config = write_config(tmp_path / "run.toml", training={"iterations": 10, "steps_per_report": 5, "steps_per_eval": 5},
                          checkpoints={"save_every": 5})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    return run


def _logits(model_path: str, adapter: str | None = None) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(model_path, adapter_path=adapter)
    return np.array(model(TOKENS).astype(mx.float32))


def test_mlx_and_fused_exports_load_in_mlx_lm(trained_run: RunDir, tmp_path: Path) -> None:
    model_path = json.loads((trained_run.adapters / "adapter_config.json").read_text())["model"]
    tunetop("export", trained_run.id, "--format", "mlx", "--output", str(tmp_path / "mlx"), check=True)
    with_adapter = _logits(model_path, str(tmp_path / "mlx"))
    # Exactly equal: the same adapter weights (copied bit for bit) through the same operations.
    assert np.array_equal(with_adapter, _logits(model_path, str(trained_run.adapters)))
    tunetop("export", trained_run.id, "--format", "fused", "--output", str(tmp_path / "fused"), check=True)
    # Fused, each weight is rounded once more (W + scale * B^T A^T) and the adapter's own two
    # products are gone: float32's rounding of the forward pass (tests/numerics.py), relative to
    # the logits' size.
    config = json.loads((Path(model_path) / "config.json").read_text())
    scale = np.abs(with_adapter).max() * forward_rtol(config, TOKENS.shape[1])
    assert np.abs(_logits(str(tmp_path / "fused")) - with_adapter).max() <= scale
    tunetop("export", trained_run.id, "--format", "mlx", "--checkpoint", "5", "--output", str(tmp_path / "at5"), check=True)
    assert np.abs(_logits(model_path, str(tmp_path / "at5")) - with_adapter).max() > 100 * scale  # another adapter


def test_peft_layout(trained_run: RunDir, tmp_path: Path) -> None:
    # The layout only: loading it with the peft package needs PyTorch, which is not installed here.
    tunetop("export", trained_run.id, "--format", "peft", "--output", str(tmp_path / "peft"), check=True)
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = mx.load(str(trained_run.adapters / "adapters.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    a, b = tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"]
    # A transpose moves numbers without rounding them: exactly equal.
    assert np.array_equal(a, np.array(ours[f"{key}.lora_a"]).T) and np.array_equal(b, np.array(ours[f"{key}.lora_b"]).T)
    assert a.shape[0] == config["r"] == 4 and b.shape[1] == 4
    assert config["lora_alpha"] == 20.0 * 4  # scale x rank: both small integers, exact in floating point
    assert {"q_proj", "v_proj", "down_proj"} <= set(config["target_modules"])


def test_export_says_what_it_wrote_and_keeps_a_folder_that_holds_files(trained_run: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = tunetop("export", trained_run.id, "--format", "mlx", "--output", str(out), check=True)
    assert "iteration 10 " in result.stdout and str(out) in result.stdout
    (out / "notes.txt").write_text("mine")
    before = (out / "adapters.safetensors").read_bytes()
    refused = tunetop("export", trained_run.id, "--format", "mlx", "--checkpoint", "5", "--output", str(out))
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (out / "adapters.safetensors").read_bytes() == before
    forced = tunetop("export", trained_run.id, "--format", "mlx", "--checkpoint", "5", "--output", str(out), "--force", check=True)
    assert "iteration 5 " in forced.stdout and (out / "notes.txt").read_text() == "mine"
    assert (out / "adapters.safetensors").read_bytes() != before


def test_export_never_writes_through_a_link(trained_run: RunDir, tmp_path: Path) -> None:
    """A link in the output folder (to another file, or to the run's own adapter) is refused, even with --force."""
    own = trained_run.adapters / "adapters.safetensors"
    own_before = own.read_bytes()
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapters.safetensors").symlink_to(own)
    (out / "adapter_config.json").symlink_to(victim)
    refused = tunetop("export", trained_run.id, "--format", "mlx", "--checkpoint", "5", "--output", str(out), "--force")
    assert refused.returncode == 2 and "symbolic links" in refused.stderr and "Traceback" not in refused.stderr
    assert own.read_bytes() == own_before and victim.read_text() == "someone's file"


def test_metrics_export(trained_run: RunDir) -> None:
    rows = list(csv.DictReader(io.StringIO(tunetop("export-metrics", trained_run.id, check=True).stdout)))
    assert [r["iteration"] for r in rows if r["type"] == "train"] == ["5", "10"]
    assert [r["iteration"] for r in rows if r["type"] == "validation"] == ["0", "5", "10"]
    lines = tunetop("export-metrics", trained_run.id, "--format", "jsonl", check=True).stdout.splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0])["type"] == "validation"


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself reads from the event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_reads_the_live_event_files_and_the_export(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 10, "steps_per_report": 5, "steps_per_eval": 5},
                          metrics={"tensorboard": True})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    events = [e for e in read_events(run.journal) if e["type"] in ("train", "validation")]
    train = {e["iteration"]: e for e in events if e["type"] == "train"}
    live = _tensorboard_scalars(run.path / "tensorboard")
    assert [step for step, _ in live["train/loss"]] == [5, 10]
    for step, value in live["train/loss"]:
        assert value == float(np.float32(train[step]["loss"]))  # TensorBoard keeps scalars as float32
    assert [step for step, _ in live["validation/loss"]] == [0, 5, 10]
    assert {"train/learning_rate", "train/tokens_per_second", "train/peak_memory_gb"} <= set(live)

    tunetop("export-metrics", run.id, "--format", "tensorboard", "--output", str(tmp_path / "tb"), check=True)
    assert _tensorboard_scalars(tmp_path / "tb") == live


def test_import_mlx_lm_config(tmp_path: Path) -> None:
    yaml_text = """
model: "mlx-community/Llama-3.2-1B-Instruct-4bit"
train: true
data: "data"
fine_tune_type: lora
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.01
    betas: [0.9, 0.98]
mask_prompt: true
num_layers: 8
batch_size: 2
iters: 600
val_batches: -1
learning_rate: 1e-5
steps_per_report: 20
steps_per_eval: 50
adapter_path: "adapters"
save_every: 100
max_seq_length: 1024
grad_checkpoint: true
seed: 3
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 16
  scale: 10.0
  dropout: 0.05
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 1000, 1e-7]
report_to: wandb
clear_cache_threshold: 0
mystery_key: 5
"""
    source = tmp_path / "lora_config.yaml"
    source.write_text(yaml_text)
    result = tunetop("import-config", str(source), "--output", str(tmp_path / "run.toml"), check=True)
    from tunetop.training import config as config_module

    cfg = config_module.parse((tmp_path / "run.toml").read_text())
    assert cfg.model.path == "mlx-community/Llama-3.2-1B-Instruct-4bit" and cfg.data.mask_prompt
    assert cfg.data.packing == "off"  # batch_size keeps mlx-lm's meaning: examples per step
    assert (cfg.training.iterations, cfg.training.batch_size, cfg.training.validation_batches) == (600, 2, 0)
    assert (cfg.lora.rank, cfg.lora.scale, cfg.lora.dropout, cfg.lora.num_layers) == (16, 10.0, 0.05, 8)
    assert cfg.lora.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay) == ("adamw", 0.01)
    assert (cfg.schedule.name, cfg.schedule.warmup, cfg.schedule.decay_steps) == ("cosine", 100, 1000)
    # 1e-7 read from YAML, written to TOML with repr and read back: the same double each time.
    assert cfg.schedule.end_learning_rate == 1e-7 and cfg.training.grad_checkpoint
    assert cfg.training.clear_cache_gb == 0  # mlx-lm's bytes, as GB: empty the cache after every step
    assert "mystery_key: unknown" in result.stdout and cfg.metrics.wandb  # report_to: wandb
    assert cfg.optimizer.betas == [0.9, 0.98] and cfg.optimizer.eps == 1e-8  # carried, and AdamW's default


