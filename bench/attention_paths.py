"""Which attention path MLX takes in training, by sequence length and mask kind.

    python bench/attention_paths.py [--batch 8] [--heads 32] [--kv-heads 8] [--dim 64]

Times forward + backward of ``mx.fast.scaled_dot_product_attention`` (bf16) and reports the
peak memory above the inputs. On MLX's CUDA backend the fused (cuDNN) backward needs the query
length to be a multiple of 128; at other lengths the backward is the unfused graph that
materialises every score (B x H x L x L), which shows as time and memory. Hence tunetop's
row widths (engine/training/data.py, engine/training/packing.py): inputs of 512, not 511.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx on Linux)


def measure(batch: int, heads: int, kv_heads: int, dim: int, length: int, mask_kind: str, repeats: int) -> tuple[float, float]:
    """(milliseconds per forward + backward, peak GB above the inputs)."""
    import mlx.core as mx

    shape_q, shape_kv = (batch, heads, length, dim), (batch, kv_heads, length, dim)
    q = mx.random.normal(shape_q).astype(mx.bfloat16)
    k = mx.random.normal(shape_kv).astype(mx.bfloat16)
    v = mx.random.normal(shape_kv).astype(mx.bfloat16)
    if mask_kind == "causal":
        mask: object = "causal"
    else:  # two examples per row, block-diagonal causal: what packing passes
        segment = (mx.arange(length) >= length // 2).astype(mx.int32)
        same = segment[:, None] == segment[None, :]
        mask = mx.broadcast_to(mx.logical_and(same, mx.tril(mx.ones((length, length), dtype=mx.bool_))), (batch, 1, length, length))
    mx.eval(q, k, v)
    if isinstance(mask, mx.array):
        mx.eval(mask)

    def loss(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, mask=mask)
        return out.astype(mx.float32).sum()

    step = mx.value_and_grad(loss, argnums=(0, 1, 2))
    mx.eval(step(q, k, v))  # warm-up (builds the cuDNN graphs)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(step(q, k, v))
    seconds = (time.perf_counter() - start) / repeats
    return seconds * 1e3, (mx.get_peak_memory() - base) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[511, 512, 2047, 2048])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import mlx.core as mx

    print(f"mlx {mx.__version__} on {mx.default_device()}; batch {args.batch}, {args.heads} heads ({args.kv_heads} kv), dim {args.dim}")
    print(f"{'length':>7} {'mask':>7} {'ms fwd+bwd':>11} {'peak GB':>8}")
    for length in args.lengths:
        for kind in ("causal", "blocks"):
            ms, gb = measure(args.batch, args.heads, args.kv_heads, args.dim, length, kind, args.repeats)
            print(f"{length:>7} {kind:>7} {ms:>11.2f} {gb:>8.2f}")


if __name__ == "__main__":
    main()
