"""The library API as the seed has it: train() saves a loadable adapter only when given a path, the
README's example runs, and a custom loss is named in a config and trains packed rows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import pytest

from engine import config
from engine.config import ConfigError, LoRAConfig
from engine.data import load_splits
from engine.demo import embedded_data_path, embedded_model_path
from engine.trainer import TrainingParameters, train
from tests.conftest import ROOT, tunetop, write_config


def _load() -> tuple[Any, Any]:
    from mlx_lm import load

    return load(str(embedded_model_path()))  # type: ignore[return-value]


@pytest.mark.parametrize("lora", [LoRAConfig(rank=4, scale=7.0, dropout=0.05, num_layers=1), LoRAConfig(fine_tune_type="dora", rank=2, keys=["self_attn.q_proj", "self_attn.v_proj"])])
def test_train_writes_an_adapter_that_loads_in_engine_and_mlx_lm(tmp_path: Path, lora: LoRAConfig) -> None:
    from mlx_lm import load

    from engine import apply_fine_tuning, load_adapters

    model, tokenizer = _load()
    apply_fine_tuning(model, lora)
    splits = load_splits(embedded_data_path(), tokenizer, mask_prompt=True)
    parameters = TrainingParameters(iterations=3, steps_per_eval=100, adapter_path=tmp_path / "adapters")
    train(model, splits["train"], splits["valid"], optim.Adam(learning_rate=1e-3), tokenizer, parameters)
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == lora.fine_tune_type
    assert saved["num_layers"] == min(lora.num_layers, len(model.layers))  # the embedded model has 4
    assert saved["lora_parameters"]["rank"] == lora.rank and saved["lora_parameters"]["scale"] == lora.scale
    assert saved["lora_parameters"]["dropout"] == lora.dropout  # a double, through JSON's repr
    if lora.keys:
        assert saved["lora_parameters"]["keys"] == sorted(lora.keys)

    model.eval()
    prompt = mx.array([tokenizer.encode("Where does Ada live?")])
    expected = model(prompt)
    fresh, _ = _load()
    load_adapters(fresh, tmp_path / "adapters")
    theirs, _ = load(str(embedded_model_path()), adapter_path=str(tmp_path / "adapters"))
    for other in (fresh, theirs):
        other.eval()
        # Exactly: mlx-lm's own layers and the same float32 weights (saved bit for bit).
        assert mx.array_equal(other(prompt), expected).item()


def test_train_without_an_adapter_path_saves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Save, apply_fine_tuning

    monkeypatch.chdir(tmp_path)
    model, tokenizer = _load()
    apply_fine_tuning(model, LoRAConfig(rank=4))
    splits = load_splits(embedded_data_path(), tokenizer)
    events: list[Any] = []
    train(model, splits["train"], None, optim.Adam(learning_rate=1e-3), tokenizer,
          TrainingParameters(iterations=4, save_every=2), progress=events.append)
    assert list(tmp_path.iterdir()) == []
    assert not any(isinstance(e, Save) for e in events)


def test_the_readme_library_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## As a library") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1)
    for placeholder, value in (
        ('"path/or/hf-id"', repr(str(embedded_model_path()))),
        ('Path("data")', f"Path({str(embedded_data_path())!r})"),
        ("iterations=200", "iterations=12"),
    ):
        assert placeholder in source
        source = source.replace(placeholder, value)
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "Train(iteration=10" in result.stdout
    assert (tmp_path / "adapters" / "adapters.safetensors").exists()


LOSSES = textwrap.dedent(
    '''
    import mlx.core as mx
    import mlx.nn as nn

    calls = []

    def cross_entropy(model, tokens, lengths, segments=None):
        """The default loss written out: the model called plainly, the mask from lengths or targets."""
        calls.append(segments is not None)
        logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        if segments is None:
            steps = mx.arange(1, targets.shape[1] + 1)
            mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
        else:
            mask = lengths
            assert segments.shape == mask.shape
        count = mask.sum()
        return (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / count, count

    def unpacked_only(model, tokens, lengths):
        return cross_entropy(model, tokens, lengths)

    def wrong(model):
        return 0

    not_a_function = 3
    '''
)


def _losses(tmp_path: Path) -> Path:
    (tmp_path / "my_losses.py").write_text(LOSSES)
    return tmp_path / "my_losses.py"


def test_a_custom_loss_in_the_config_trains_packed_rows_as_the_default_does(tmp_path: Path) -> None:
    from engine.session import build_trainer

    _losses(tmp_path)
    curves = []
    for loss in ("", "my_losses.py:cross_entropy"):
        path = write_config(tmp_path / "run.toml", data={"packing": "on", "pack_length": 128},
                            training={"loss": loss, "iterations": 3, "batch_size": 2})
        cfg = config.load(path)
        trainer, *_ = build_trainer(cfg, tmp_path / f"adapters{len(curves)}")
        assert trainer.parameters.pack_width == 128
        curves.append([trainer.step().loss for _ in range(3)] + [trainer.validate().loss])
    module = sys.modules[next(n for n in sys.modules if n.startswith("tunetop_loss_my_losses"))]
    assert True in module.calls and False in module.calls  # packed training steps, unpacked validation
    # The same numbers: the plain model call inside the custom loss ran packed (block mask, positions).
    # Exactly: the custom loss is the default's operations written out, on the same bits.
    assert curves[1] == curves[0]


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ("no_colon", r"write it as \"package.module:function\""),
        ("no_such_package.losses:f", r"cannot import no_such_package.losses \(ModuleNotFoundError"),
        ("my_losses.py:missing", r"has no 'missing'. Its functions: cross_entropy, unpacked_only, wrong"),
        ("my_losses.py:not_a_function", r"'not_a_function' is a int, not a function"),
        ("my_losses.py:wrong", r"wrong must accept \(model, tokens, lengths\)"),
        ("elsewhere.py:f", r"the file elsewhere.py does not exist"),
    ],
)
def test_a_bad_custom_loss_is_named_before_the_model_loads(tmp_path: Path, loss: str, message: str) -> None:
    from engine.session import build_trainer

    _losses(tmp_path)
    cfg = config.load(write_config(tmp_path / "run.toml", training={"loss": loss}))
    with pytest.raises(ConfigError, match=r"training.loss = .*" + message):
        build_trainer(cfg, tmp_path / "adapters")


def test_a_custom_loss_without_segments_trains_unpacked_or_is_refused_with_packing_on(tmp_path: Path) -> None:
    from engine.session import build_trainer

    _losses(tmp_path)
    lines: list[str] = []
    cfg = config.load(write_config(tmp_path / "run.toml", data={"packing": "auto"}, training={"loss": "my_losses.py:unpacked_only"}))
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters", report=lines.append)
    assert trainer.parameters.pack_width == 0 and any("takes no segments parameter" in line for line in lines)
    trainer.step()
    path = write_config(tmp_path / "run.toml", data={"packing": "on"}, training={"loss": "my_losses.py:unpacked_only"})
    result = tunetop("train", str(path))
    assert result.returncode == 2
    assert "needs training.loss = " in result.stderr + result.stdout and "segments=None" in result.stderr + result.stdout
