"""Sequence packing: packed rows give each example exactly the loss it has alone."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.data import Dataset, Example, load_splits
from engine.demo import embedded_data_path, embedded_model_path
from engine.packing import (
    PackedCache,
    PackPlan,
    block_causal_mask,
    pack_rows,
    pack_width,
    packed_loss,
    prepare_model,
    restarting_positions,
)
from tests.numerics import float32_error, forward_rtol, gradient, sum_rtol


@pytest.fixture(scope="module")
def model_and_data() -> tuple[nn.Module, Dataset]:
    from mlx_lm import load

    model, tokenizer = load(str(embedded_model_path()))
    prepare_model(model)
    train = load_splits(embedded_data_path(), tokenizer, mask_prompt=True)["train"]
    # Varied lengths and prompt offsets, plus one without a prompt and a 1-token example.
    examples = train.examples[:14] + [Example(train.examples[0].tokens, 0), Example([5], 0)]
    return model, Dataset(examples, "test")


def unpacked_losses(model: nn.Module, dataset: Dataset) -> list[tuple[float, int]]:
    """(loss sum, counted tokens) of each example alone, as the default (unpacked) loss counts them."""
    out = []
    for example in dataset.examples:
        tokens = mx.array([example.tokens])
        if len(example.tokens) < 2:
            out.append((0.0, 0))
            continue
        logits = model(tokens[:, :-1])
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:])[0]
        steps = np.arange(1, len(example.tokens))
        counted = mx.array((steps >= example.offset).astype(np.float32))
        out.append((float((ce * counted).sum().item()), int(counted.sum().item())))
    return out


def test_per_example_losses_of_packed_rows_match_unpacked(model_and_data: tuple[nn.Module, Dataset]) -> None:
    model, dataset = model_and_data
    width = 128
    plan = PackPlan(dataset, batch_size=1, width=width)
    assert len(plan.rows) < len(dataset.examples)  # several examples share rows
    batch = plan.make_batch(list(range(len(plan.rows))))
    tokens, segments, positions, targets = batch.arrays()
    with restarting_positions(positions):
        caches = [PackedCache(block_causal_mask(segments)) for _ in model.layers]
        logits = model(tokens[:, :-1], cache=caches)
    ce = np.array(nn.losses.cross_entropy(logits, tokens[:, 1:]) * targets)
    counts = np.array(targets)
    expected = unpacked_losses(model, dataset)
    # Packed and alone, an example's tokens go through other shapes (so other kernels and
    # summation orders): float32's rounding of the forward pass (tests/numerics.py).
    rtol = forward_rtol(json.loads((embedded_model_path() / "config.json").read_text()), width)
    for r, row in enumerate(plan.rows):
        for segment, example in enumerate(row, start=1):
            mine = np.array(batch.segments[r]) == segment
            total, count = float(ce[r][mine].sum()), int(counts[r][mine].sum())
            want_total, want_count = expected[example]
            assert count == want_count, example
            if count:
                assert total / count == pytest.approx(want_total / want_count, rel=rtol), example
    # The batch loss and token count are the unpacked batch's: the mean over every counted token.
    value, count = packed_loss(model, tokens, segments, positions, targets)
    assert int(count.item()) == sum(c for _t, c in expected) == batch.real_tokens
    assert value.item() == pytest.approx(sum(t for t, _c in expected) / sum(c for _t, c in expected), rel=rtol)


def test_rows_are_one_shape_and_hold_every_example_once(model_and_data: tuple[nn.Module, Dataset]) -> None:
    _model, dataset = model_and_data
    lengths = [len(e.tokens) for e in dataset.examples]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    plan = PackPlan(dataset, batch_size=2, width=128, seed=3)
    batches = list(plan.iterate(0, 0, loop=False))
    assert {b.tokens.shape for _e, _k, b in batches} == {(2, 129)}  # 128 inputs + the last target
    again = list(plan.iterate(0, 1, loop=False))  # resuming at batch 1 continues the same order
    assert [b.tokens.tolist() for _e, _k, b in again] == [b.tokens.tolist() for _e, _k, b in batches[1:]]
    other_epoch = next(plan.iterate(1, 0, loop=False))[2]
    assert other_epoch.tokens.tolist() != batches[0][2].tokens.tolist() or len(plan.rows) <= 2


def test_pack_width_follows_the_long_examples() -> None:
    dataset = Dataset([Example(list(range(n))) for n in [10] * 90 + [300] * 10], "d")
    assert pack_width(dataset, 2048) == 512  # the 95th percentile (300) rounded up to a power of two
    assert pack_width(dataset, 256) == 256


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(
    model_and_data: tuple[nn.Module, Dataset], packed: bool
) -> None:
    from functools import partial

    from mlx_lm import load

    from engine.adapters import apply_fine_tuning
    from engine.config import LoRAConfig
    from engine.data import BatchPlan
    from engine.trainer import default_loss

    _shared, dataset = model_and_data
    model, _tokenizer = load(str(embedded_model_path()))  # its own copy: LoRA is applied in place
    prepare_model(model)
    apply_fine_tuning(model, LoRAConfig(rank=4))
    if packed:
        arrays = PackPlan(dataset, batch_size=2, width=128).make_batch([0, 1]).arrays()
        loss = packed_loss
    else:
        arrays = next(BatchPlan(dataset, 4, 2048).iterate(loop=False))[2].arrays()
        loss = default_loss
    chunked_loss = partial(loss, ce_chunk_tokens=16)
    full, count = loss(model, *arrays)
    chunked, count2 = chunked_loss(model, *arrays)
    assert count.item() == count2.item()
    # The logits of a chunk come from a smaller matrix product (other kernels, other rounding):
    # the projection's sums (hidden_size terms), the log-sum-exp over the vocabulary, then the
    # sum over the counted tokens (tests/numerics.py).
    config = json.loads((embedded_model_path() / "config.json").read_text())
    terms = config["hidden_size"] + config["vocab_size"] + int(count.item())
    assert chunked.item() == pytest.approx(full.item(), rel=sum_rtol(terms))
    # Gradients: within twice float32's own error on this gradient on this CPU.
    expected = gradient(model, loss, arrays)
    bound = 2 * float32_error(model, loss, arrays, expected)
    assert np.linalg.norm(gradient(model, chunked_loss, arrays) - expected) <= bound
