"""Cross-entropy without the full logits: the output projection and the loss, a chunk at a time.

With a 128k vocabulary the logits of one batch (tokens x vocab, and the same again for their
gradient) are the largest arrays of a LoRA step. Here the model runs up to its last hidden
state; then each chunk of ``chunk_tokens`` positions is projected to the vocabulary and scored
inside ``mx.checkpoint``, so the backward pass recomputes that chunk's logits instead of keeping
every chunk's. Memory for logits drops to one chunk's; the price is one more projection matmul
per chunk in the backward pass (docs/PERFORMANCE.md has both figures).

Only for the decoder families whose head is a plain projection (or tied embeddings) and stays
frozen: anything else falls back to the full logits, saying so once.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3"})


def head_of(model: nn.Module) -> Any:
    """The function from last hidden state to logits, or None when chunking cannot be used here."""
    kind = getattr(model, "model_type", "")
    backbone = getattr(model, "model", None)
    if kind not in SUPPORTED or backbone is None:
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        head = backbone.embed_tokens
        project = head.as_linear
    elif isinstance(getattr(model, "lm_head", None), nn.Module):
        head = model.lm_head
        project = head
    else:
        return None
    if tree_flatten(head.trainable_parameters()):
        return None  # a trained head needs its gradient, which checkpointed chunks would not carry
    return project


_warned = False


def summed_cross_entropy(
    model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array, chunk_tokens: int, **model_kwargs: Any
) -> mx.array:
    """Sum over positions of cross-entropy x ``weights`` (0/1 per target), in float32.

    ``chunk_tokens`` > 0 scores that many positions at a time without keeping their logits.
    """
    project = head_of(model) if chunk_tokens > 0 else None
    if project is None:
        if chunk_tokens > 0:
            global _warned
            if not _warned:
                _warned = True
                warnings.warn(
                    f"training.ce_chunk_tokens is set but {getattr(model, 'model_type', 'this model')} is not one "
                    f"of {', '.join(sorted(SUPPORTED))} with a frozen output head: using the full logits.",
                    stacklevel=2,
                )
        logits = model(inputs, **model_kwargs)
        return (nn.losses.cross_entropy(logits, targets) * weights).astype(mx.float32).sum()
    hidden = model.model(inputs, **model_kwargs)  # type: ignore[operator]
    width = hidden.shape[-1]
    hidden = hidden.reshape(-1, width)
    flat_targets = targets.reshape(-1)
    flat_weights = weights.reshape(-1)

    def chunk_loss(h: mx.array, t: mx.array, w: mx.array) -> mx.array:
        # mx.checkpoint differentiates every argument; token ids have no gradient.
        t, w = mx.stop_gradient(t), mx.stop_gradient(w)
        return (nn.losses.cross_entropy(project(h), t) * w).astype(mx.float32).sum()

    checkpointed = mx.checkpoint(chunk_loss)
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpointed(hidden[start:stop], flat_targets[start:stop], flat_weights[start:stop])
    return total
