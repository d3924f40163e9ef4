"""LoRA products in the model's precision, with the LoRA weights kept in float32.

mlx-lm's ``LoRALinear`` multiplies a bf16 (or fp16) activation by its float32 ``lora_a``;
MLX promotes the activation to float32 for that product and keeps the float32 copy for the
backward pass: one copy of every adapted layer's input, in twice the model's bytes. Here the
LoRA weights are cast to the activation's dtype inside the product instead (as PyTorch's
autocast does for PEFT): the products run in bf16 with float32 accumulation, the gradient
flows back through the cast to the float32 weights, and Adam's state stays float32. A float32
model (the embedded one, CPU runs) is unchanged: the casts are no-ops.

Saved adapters are the same float32 tensors in mlx-lm's layout.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear


class ModelPrecisionLoRALinear(LoRALinear):
    """``LoRALinear`` whose low-rank product runs in the input's dtype."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        dtype = x.dtype
        z = (self.dropout(x) @ self.lora_a.astype(dtype)) @ self.lora_b.astype(dtype)
        return y + (self.scale * z).astype(dtype)


def use_model_precision(model: nn.Module) -> int:
    """Switch every plain ``LoRALinear`` of ``model`` to the model-precision product; returns how many.

    The class is swapped in place: parameters, freezing and module paths stay as mlx-lm made them.
    """
    count = 0
    for _name, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = ModelPrecisionLoRALinear
            count += 1
    return count
