"""Tolerances that follow from the computation, so that they hold on any CPU.

Two float32 computations of the same mathematics differ only by rounding; how much depends on
what is computed (how many terms a sum has, in what order, which BLAS kernel the CPU picks), so
a comparison either asserts exact equality, where both sides run the same operations on the same
bits, or a bound derived from the computation: a sum's rounding (below), or float32's own error
on that computation measured against float64 on the machine running the test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
"""2**-23 = 1.19e-7: float32's spacing at 1, twice its unit roundoff u."""


def sum_rtol(terms: int) -> float:
    """Relative bound on the difference of two float32 sums (or means) of the same ``terms``
    terms of one sign, added in any order (blocked, pairwise or by a BLAS kernel).

    Each is within gamma_(n-1) = (n-1)u / (1-(n-1)u) of the exact sum (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., section 4.2), so they differ by at most about
    2(n-1)u < n * eps.
    """
    return max(terms, 1) * F32_EPS


def forward_rtol(config: dict, width: int) -> float:
    """Relative bound on the float32 rounding of a transformer's outputs (logits, a loss)
    computed two ways: other batch shapes, kernels or summation orders, same weights.

    To first order the relative roundings of the sums along the way add up: per block the
    projections (``hidden_size`` terms each: q/k/v, o, and the MLP's gate/up), the attention
    scores (head_dim terms) and their weighted sum over the row (``width``), the MLP's down
    projection (``intermediate_size``); then the log-sum-exp over the vocabulary. ``config`` is
    the model's config.json. For the embedded model at width 128: 3686 terms, 4.4e-4.
    """
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head = hidden // config["num_attention_heads"]
    per_block = 3 * hidden + head + width + intermediate
    return sum_rtol(config["num_hidden_layers"] * per_block + config["vocab_size"])


def gradient(model: Any, loss: Any, arrays: tuple[Any, ...], dtype: Any = None) -> np.ndarray:
    """``loss``'s gradient with respect to ``model``'s trainable parameters, flattened (as
    float64 numbers), computed in ``dtype`` (float32 when None); the model is cast there and
    back (float32 -> float64 -> float32 is exact)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if dtype is not None:
        model.set_dtype(dtype)
    try:
        with mx.stream(mx.cpu if dtype is not None and dtype == mx.float64 else mx.default_device()):  # MLX has float64 on the CPU only
            _value, grad = nn.value_and_grad(model, loss)(model, *arrays)
            return np.concatenate([np.array(g).astype(np.float64).ravel() for _, g in tree_flatten(grad)])
    finally:
        if dtype is not None:
            model.set_dtype(mx.float32)


def float32_error(model: Any, loss: Any, arrays: tuple[Any, ...], in_float32: np.ndarray) -> float:
    """float32's own error on a gradient on this machine: the distance of ``in_float32`` (from
    :func:`gradient`) from the same gradient computed in float64. Two float32 computations of
    one gradient (other summation orders, kernels) that are each that accurate are within twice
    that of each other, whatever the CPU."""
    import mlx.core as mx

    error = float(np.linalg.norm(in_float32 - gradient(model, loss, arrays, mx.float64)))
    assert 0 < error < 1e-2 * float(np.linalg.norm(in_float32)), "the float64 reference does not work"
    return error
