"""Sequence packing: several examples per row, each seeing only itself, positions restarting.

Real datasets are variable-length; padding every row to the longest wastes compute, and a step
of a few short examples keeps an accelerator idle. Packing fills rows of ``width`` tokens with
whole examples (best-fit decreasing: ~95%+ of the tokens are real), and every training batch
is ``batch_size`` such rows: one shape for the whole run, so the step compiles once.

Within a row nothing crosses an example boundary: attention gets a block-diagonal causal mask
(given to mlx-lm's models through the per-layer ``cache`` argument, whose ``make_mask`` they
call), RoPE positions restart at 0 for each example (:class:`RestartingRoPE` applies per-token
positions), and the loss covers exactly the tokens the unpacked example's loss covers. So
per-example losses equal the unpacked ones (tests/test_packing.py), and the batch loss is the
mean over its real tokens, as without packing.

A row holds ``width + 1`` tokens, so the model's input (every token but the last) is ``width``
long: a power of two, which MLX's CUDA attention needs (a multiple of 128) for its fused
backward pass with the block mask.

What changes is the number of examples per step: a packed batch holds ``batch_size`` rows of
``width`` tokens, about ``batch_size * width / mean length`` examples. ``data.packing`` picks:
``auto`` (default) packs when rows would hold two or more examples on average, ``on``, ``off``.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import DataError, Dataset, bucket_width, warn_truncated

MIN_WIDTH = 64


@dataclass(frozen=True)
class PackedBatch:
    """``batch_size`` rows of packed examples, as numpy arrays.

    ``tokens`` (R, W + 1); for the W input positions: ``segments`` (example number within the row,
    from 1; 0 = padding), ``positions`` (restarting per example) and ``targets`` (1 where the
    next token counts for the loss).
    """

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    targets: np.ndarray

    @property
    def real_tokens(self) -> int:
        return int(self.targets.sum())

    def arrays(self) -> tuple[mx.array, ...]:
        return mx.array(self.tokens), mx.array(self.segments), mx.array(self.positions), mx.array(self.targets)

    def rows(self, start: int, stop: int) -> PackedBatch:
        """A block of rows (a rank's share of a data-parallel batch)."""
        part = slice(start, stop)
        return PackedBatch(self.tokens[part], self.segments[part], self.positions[part], self.targets[part])


def pack_width(dataset: Dataset, max_seq_length: int) -> int:
    """A row width that holds the long examples whole: the power of two at or above the 95th
    percentile length (at least 64, at most ``max_seq_length``)."""
    lengths = np.array([len(e.tokens) for e in dataset.examples])
    p95 = int(np.percentile(lengths, 95)) if len(lengths) else MIN_WIDTH
    width = MIN_WIDTH
    while width < p95:
        width *= 2
    return min(width, max_seq_length)


def helps(dataset: Dataset, width: int) -> bool:
    """Packing pays when a row holds two or more examples on average."""
    mean = float(np.mean([min(len(e.tokens), width) for e in dataset.examples])) if dataset.examples else width
    return mean <= width / 2


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Example indices per row, best-fit decreasing: each example (longest first) goes into the
    row it fills most tightly. Deterministic for the same lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-min(lengths[i], width), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row number), sorted
    for i in order:
        need = min(lengths[i], width)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            space -= need
        else:
            row = len(rows)
            rows.append([i])
            space = width - need
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


class PackPlan:
    """Packed rows of a dataset, ``batch_size`` rows per batch, in a seeded, resumable order.

    Rows are made once; each epoch shuffles them (a pure function of seed and epoch) and cuts
    the order into batches, so (epoch, index) is a resumable position, as with BatchPlan.

    An example longer than a row is not cut to the row: it keeps up to ``max_seq_length`` tokens
    (as without packing) in a row of its own, padded to a bucket width (engine.data), and such
    rows make batches of their own, ``batch_size`` rows of similar length (the last one filled
    with empty rows). Each such width compiles the step once more.
    """

    def __init__(self, dataset: Dataset, batch_size: int, width: int, seed: int = 0, max_seq_length: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.width = width
        self.seed = seed
        self.max_seq_length = max(max_seq_length or width, width)
        self.capacity = width + 1  # tokens per row: ``width`` inputs, then one more target
        self.kept = [min(len(e.tokens), self.max_seq_length) for e in dataset.examples]
        warn_truncated(dataset, self.max_seq_length)
        short = [i for i, n in enumerate(self.kept) if n <= self.capacity]
        long = sorted((i for i, n in enumerate(self.kept) if n > self.capacity), key=lambda i: (self.kept[i], i))
        self.rows = [[short[j] for j in row] for row in pack_rows([self.kept[i] for i in short], self.capacity)]
        self.packed_rows = len(self.rows)
        if 0 < self.packed_rows < batch_size:
            raise DataError(
                f"{dataset.source}: packs into {self.packed_rows} rows of {width} tokens but batch_size is "
                f"{batch_size} rows. Lower training.batch_size, data.pack_length, or set data.packing = \"off\"."
            )
        # Rows of one long example each, shortest first, batch_size to a batch; -1 = an empty row.
        own = list(range(self.packed_rows, self.packed_rows + len(long)))
        self.rows += [[i] for i in long]
        self.long_batches = [own[k : k + batch_size] for k in range(0, len(own), batch_size)]
        if self.long_batches:
            self.long_batches[-1] += [-1] * (batch_size - len(self.long_batches[-1]))
        used = sum(self.kept[i] for i in short)
        self.fill = used / (self.packed_rows * self.capacity) if self.packed_rows else 1.0

    def __len__(self) -> int:
        return self.packed_rows // self.batch_size + len(self.long_batches)

    def describe(self) -> str:
        count = len(self.dataset.examples)
        per_row = count / max(len(self.rows), 1)
        own = len(self.rows) - self.packed_rows
        long = (f"; {own:,} example{'s' if own > 1 else ''} longer than a row train in rows of their own "
                f"(up to data.max_seq_length = {self.max_seq_length} tokens)") if own else ""
        return (f"packing {count:,} examples into {len(self.rows):,} rows of {self.width} tokens "
                f"({self.fill:.0%} real tokens, {per_row:.1f} examples per row); a step trains {self.batch_size} "
                f"rows, about {per_row * self.batch_size:.0f} examples{long}")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the packed rows for one epoch."""
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.packed_rows)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Row numbers of each batch of one epoch, in order."""
        order = [int(r) for r in self.epoch_order(epoch)]
        size = self.batch_size
        batches = [order[k * size : (k + 1) * size] for k in range(self.packed_rows // size)]
        if not self.long_batches:
            return batches
        batches += self.long_batches
        shuffle = np.random.default_rng([self.seed, epoch, 2]).permutation(len(batches))
        return [batches[int(k)] for k in shuffle]

    def make_batch(self, row_numbers: list[int]) -> PackedBatch:
        """The given rows (-1: an empty one) as arrays, ``width`` wide or a long example's bucket."""
        rows = [self.rows[r] if r >= 0 else [] for r in row_numbers]
        longest = max(sum(self.kept[i] for i in row) for row in rows)
        width = self.width if longest <= self.capacity else bucket_width(longest, self.max_seq_length) - 1
        count = len(row_numbers)
        tokens = np.zeros((count, width + 1), dtype=np.int32)
        segments = np.zeros((count, width), dtype=np.int32)
        positions = np.zeros((count, width), dtype=np.int32)
        targets = np.zeros((count, width), dtype=np.float32)
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                example = self.dataset.examples[i]
                kept = example.tokens[: self.kept[i]]
                n = len(kept)
                tokens[r, start : start + n] = kept
                inputs = slice(start, min(start + n, width))  # input positions of this example
                segments[r, inputs] = segment
                positions[r, inputs] = np.arange(inputs.stop - inputs.start)
                # Input at p predicts token p + 1: the unpacked loss counts tokens k with
                # max(offset, 1) <= k < n, i.e. inputs start + k - 1.
                first = start + max(min(example.offset, n), 1) - 1
                targets[r, first : start + n - 1] = 1.0
                start += n
        return PackedBatch(tokens, segments, positions, targets)

    def iterate(self, epoch: int = 0, index: int = 0, loop: bool = True) -> Iterator[tuple[int, int, PackedBatch]]:
        """Yield ``(epoch, index, batch)`` from the given position on, forever when ``loop``."""
        while True:
            batches = self.epoch_batches(epoch)
            for k in range(index, len(batches)):
                yield epoch, k, self.make_batch(batches[k])
            if not loop:
                return
            epoch, index = epoch + 1, 0


# -- the model side ------------------------------------------------------------------------------


class _Positions:
    """The per-token positions of the forward pass being traced (None outside packed passes)."""

    current: mx.array | None = None


@contextlib.contextmanager
def restarting_positions(positions: mx.array) -> Iterator[None]:
    _Positions.current = positions
    try:
        yield
    finally:
        _Positions.current = None


class RestartingRoPE(nn.Module):
    """Wraps a model's RoPE: inside a packed pass each token is rotated by its own position.

    mx.fast.rope takes one offset per sequence, so the (B, H, L, D) input is viewed as B*L
    sequences of one token, each with its position as offset. Outside packed passes (sampling,
    validation) it is the wrapped RoPE unchanged.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        positions = _Positions.current
        if positions is None:
            return self.inner(x, offset=offset)
        b, h, length, d = x.shape
        flat = x.transpose(0, 2, 1, 3).reshape(b * length, h, 1, d)
        out = self.inner(flat, offset=positions.reshape(-1))
        return out.reshape(b, length, h, d).transpose(0, 2, 1, 3)


def prepare_model(model: nn.Module) -> bool:
    """Wrap every attention layer's RoPE, and let the module holding the blocks take the block
    mask from :func:`packed_forward`; False when the model has no RoPE (packing cannot restart
    its positions, so it is not used)."""
    found = False
    for _name, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if isinstance(rope, RestartingRoPE):
            found = True
        elif isinstance(rope, nn.Module):
            module.rope = RestartingRoPE(rope)
            found = True
        if isinstance(module.get("layers"), list) and _takes_cache(type(module)):
            module.__class__ = _masking_class(type(module))
    return found


class _Packed:
    """The block mask of the packed forward pass being traced (None outside :func:`packed_forward`)."""

    mask: mx.array | None = None


@contextlib.contextmanager
def packed_forward(segments: mx.array, positions: mx.array) -> Iterator[None]:
    """Inside, a prepared model called without a cache (``model(inputs)``, as a custom loss calls
    it) runs packed: attention within each example, positions restarting per example."""
    _Packed.mask = block_causal_mask(segments)
    try:
        with restarting_positions(positions):
            yield
    finally:
        _Packed.mask = None


def runs_packed(model: nn.Module) -> bool:
    """Whether :func:`packed_forward` reaches this (prepared) model's attention."""
    return any(getattr(type(m), "takes_packed_mask", False) for _n, m in model.named_modules())


def _takes_cache(cls: type) -> bool:
    try:
        return "cache" in inspect.signature(cls.__call__).parameters  # type: ignore[operator]
    except (TypeError, ValueError):
        return False


_MASKING: dict[type, type] = {}


def _masking_class(cls: type) -> type:
    """``cls`` (a module holding the blocks) whose call without a cache uses the packed mask."""
    if getattr(cls, "takes_packed_mask", False):
        return cls
    if cls not in _MASKING:
        forward = cls.__call__  # type: ignore[operator]
        signature = inspect.signature(forward)

        def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if _Packed.mask is None:
                return forward(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            if bound.arguments.get("cache") is None:
                bound.arguments["cache"] = [PackedCache(_Packed.mask) for _ in self.layers]  # type: ignore[attr-defined]
            return forward(*bound.args, **bound.kwargs)

        namespace = {"__call__": call, "takes_packed_mask": True, "__module__": cls.__module__}
        _MASKING[cls] = type(f"Packing{cls.__name__}", (cls,), namespace)
    return _MASKING[cls]


class PackedCache:
    """Stands in for a layer's KV cache: no caching, and the block-diagonal mask when asked."""

    offset = 0

    def __init__(self, mask: mx.array) -> None:
        self.mask = mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, *_args: Any, **_kwargs: Any) -> mx.array:
        return self.mask


def block_causal_mask(segments: mx.array) -> mx.array:
    """(R, 1, L, L) booleans: a token sees earlier tokens of its own example (padding sees padding)."""
    length = segments.shape[1]
    same = segments[:, None, :, None] == segments[:, None, None, :]
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    return mx.logical_and(same, causal)


def packed_custom_loss(loss: Any) -> Any:
    """A custom loss (engine.custom_loss) on packed batches: ``loss(model, tokens, targets,
    segments=segments)`` inside :func:`packed_forward`."""

    def call(
        model: nn.Module, tokens: mx.array, segments: mx.array, positions: mx.array, targets: mx.array
    ) -> tuple[mx.array, mx.array]:
        with packed_forward(segments, positions):
            return loss(model, tokens, targets, segments=segments)  # type: ignore[no-any-return]

    return call


def packed_loss(
    model: nn.Module,
    tokens: mx.array,
    segments: mx.array,
    positions: mx.array,
    targets: mx.array,
    ce_chunk_tokens: int = 0,
) -> tuple[mx.array, mx.array]:
    """Cross-entropy over the counted tokens of packed rows; returns (mean loss, token count)."""
    from .chunked_loss import summed_cross_entropy

    mask = block_causal_mask(segments)
    caches = [PackedCache(mask) for _ in model.layers]  # type: ignore[attr-defined]
    with restarting_positions(positions):
        total = summed_cross_entropy(model, tokens[:, :-1], tokens[:, 1:], targets, ce_chunk_tokens, cache=caches)
    count = targets.sum()
    return total / count, count
