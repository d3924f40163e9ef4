"""LoRA products in the model's dtype (tunetop.training.lora_precision): same training signal, less memory."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load
from mlx_lm.tuner.lora import LoRALinear

from tunetop.training.adapters import apply_fine_tuning
from tunetop.training.config import LoRAConfig
from tunetop.training.data import BatchPlan, load_splits
from tunetop.training.embedded import embedded_data_path, embedded_model_path
from tunetop.training.lora_precision import ModelPrecisionLoRALinear
from tunetop.training.trainer import default_loss


def lora_model(dtype: mx.Dtype, model_precision: bool) -> nn.Module:
    model, _tokenizer = load(str(embedded_model_path()))
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.random.seed(0)  # the same LoRA initialisation for every variant
    apply_fine_tuning(model, LoRAConfig(num_layers=-1, rank=8, model_precision=model_precision))
    return model


def test_model_precision_lora_keeps_float32_weights_and_less_memory() -> None:
    plain, mixed = lora_model(mx.bfloat16, False), lora_model(mx.bfloat16, True)
    lora = [m for _n, m in mixed.named_modules() if isinstance(m, LoRALinear)]
    assert lora and all(type(m) is ModelPrecisionLoRALinear for m in lora)
    assert not any(type(m) is ModelPrecisionLoRALinear for _n, m in plain.named_modules())
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(2, 480, size=(8, 257)).astype(np.int32))  # ids within the vocabulary
    lengths = mx.array(np.array([[0, 257]] * 8, dtype=np.int32))
    peaks = []
    for model in (plain, mixed):
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        (loss, _count), grad = nn.value_and_grad(model, default_loss)(model, tokens, lengths)
        mx.eval(loss, grad)
        peaks.append(mx.get_peak_memory())
        assert all(g.dtype == mx.float32 for _k, g in tree_flatten(grad))  # so Adam's state stays float32
    # No float32 copy of every adapted layer's input is kept for the backward pass.
    assert peaks[1] < 0.9 * peaks[0], peaks


def test_model_precision_lora_trains_as_well_as_float32_products() -> None:
    _model, tokenizer = load(str(embedded_model_path()))
    train = load_splits(embedded_data_path(), tokenizer, False)["train"]
    batches = [batch.arrays() for _e, _k, batch in BatchPlan(train, 8, 256).iterate(0, 0, loop=False)][:20]
    curves = []
    for model_precision in (False, True):
        model = lora_model(mx.bfloat16, model_precision)
        optimizer = optim.Adam(learning_rate=2e-4)
        loss_and_grad = nn.value_and_grad(model, default_loss)
        losses = []
        for tokens, lengths in batches * 2:
            (loss, _count), grad = loss_and_grad(model, tokens, lengths)
            optimizer.update(model, grad)
            mx.eval(model.parameters(), optimizer.state, loss)
            losses.append(loss.item())
        curves.append((float(np.mean(losses[:10])), float(np.mean(losses[-10:]))))
    (plain_start, plain_end), (mixed_start, mixed_end) = curves
    assert plain_end < 0.8 * plain_start and mixed_end < 0.8 * mixed_start  # both learn
    assert mixed_end < 1.05 * plain_end, curves
