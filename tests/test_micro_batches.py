"""training.micro_batches: a step's rows in several passes give the update of one pass (issue 22).

The trainer's real step (compiled, packed rows of the embedded model) with SGD at a learning rate
of 1 from LoRA's zero-initialised B matrices: with B = 0 the A matrices get no gradient, and
0 - 1 * g is exact, so the weights after one step are minus the step's gradient, bit for bit.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.numerics import F32_EPS, float32_error, forward_rtol, gradient
from tunetop.training.data import Dataset, load_splits
from tunetop.training.embedded import embedded_data_path, embedded_model_path
from tunetop.training.packing import PackPlan, packed_loss, prepare_model
from tunetop.training.trainer import Trainer, TrainingParameters, split_rows

WIDTH = 128
ROWS = 4


def fresh_model() -> nn.Module:
    """The embedded model with LoRA (rank 4) drawn from one seed: every call gives the same weights."""
    from mlx_lm import load

    from tunetop.training.adapters import apply_fine_tuning
    from tunetop.training.config import LoRAConfig

    model, _tokenizer = load(str(embedded_model_path()))
    model.set_dtype(mx.float32)
    mx.random.seed(7)
    apply_fine_tuning(model, LoRAConfig(rank=4))
    prepare_model(model)
    return model


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    from mlx_lm import load

    _model, tokenizer = load(str(embedded_model_path()))
    return load_splits(embedded_data_path(), tokenizer, mask_prompt=True)["train"]


def one_step(dataset: Dataset, micro_batches: int, accumulation: int = 1) -> tuple[float, np.ndarray, nn.Module]:
    """(the step's reported loss, the trainable weights after it, flattened, the model)."""
    model = fresh_model()
    parameters = TrainingParameters(
        batch_size=ROWS, iterations=1, pack_width=WIDTH, max_seq_length=WIDTH, micro_batches=micro_batches,
        grad_accumulation_steps=accumulation, seed=3,
    )
    trainer = Trainer(model, optim.SGD(learning_rate=1.0), dataset, None, parameters, lambda _step: 1.0)
    result = trainer.step()
    weights = np.concatenate([np.array(v).astype(np.float64).ravel() for _, v in tree_flatten(model.trainable_parameters())])
    return result.loss, weights, model


def first_batch(dataset: Dataset) -> tuple[mx.array, ...]:
    """The batch the trainer's first step takes (its plan is a pure function of the data and seed)."""
    _epoch, _index, batch = next(PackPlan(dataset, ROWS, WIDTH, seed=3, max_seq_length=WIDTH).iterate())
    return batch.arrays()


def test_a_step_in_micro_batches_gives_the_unsplit_loss_and_gradients(dataset: Dataset) -> None:
    batch = first_batch(dataset)
    halves = [part.arrays() for part in split_rows(next(PackPlan(dataset, ROWS, WIDTH, 3, WIDTH).iterate())[2], 2)]
    counts = [int(packed_loss(fresh_model(), *half)[1].item()) for half in halves]
    assert counts[0] != counts[1], "the halves must hold different numbers of real tokens for this test to mean anything"

    model = fresh_model()
    before = np.concatenate([np.array(v).astype(np.float64).ravel() for _, v in tree_flatten(model.trainable_parameters())])
    expected = gradient(model, packed_loss, batch)  # float32, the whole batch in one pass
    assert np.count_nonzero(expected) and np.all(before[expected != 0] == 0)  # only B (zeros) moves: 0 - g is exact

    loss1, after1, _ = one_step(dataset, 1)
    loss2, after2, _ = one_step(dataset, 2)
    loss4, after4, _ = one_step(dataset, 4)
    # The unsplit trainer step is the gradient above, computed the same way.
    assert np.array_equal(after1 - before, -expected)

    # Loss: each row's forward runs in a batch of another shape (other kernels, other rounding
    # inside each block: tests/numerics.py forward_rtol), then the sum over the tokens regroups
    # (micro-batch sums, weighted by their counts) and divides once more.
    config = json.loads((embedded_model_path() / "config.json").read_text())
    rtol = forward_rtol(config, WIDTH) + (sum(counts) + 4) * F32_EPS
    assert loss2 == pytest.approx(loss1, rel=rtol) and loss4 == pytest.approx(loss1, rel=rtol)

    # Gradients: a split step changes only the order of the sums over tokens, plus one multiply by
    # a micro-batch's token count and one divide by the step's per element (2 roundings, each
    # within eps of the value). Two float32 computations of one gradient that are each as accurate
    # as float32 is on this gradient on this CPU (measured against float64) are within twice that.
    bound = 2 * float32_error(model, packed_loss, batch, expected) + 2 * F32_EPS * float(np.linalg.norm(expected))
    for after in (after2, after4):
        assert np.linalg.norm((after - before) + expected) <= bound, (np.linalg.norm((after - before) + expected), bound)

    # And the bound tells the right update from a plausible wrong one: the mean of the halves' means
    # (what grad_accumulation_steps does across batches) weighs the halves' tokens unequally.
    mean_of_means = (gradient(fresh_model(), packed_loss, halves[0]) + gradient(fresh_model(), packed_loss, halves[1])) / 2
    assert np.linalg.norm(mean_of_means - expected) > 10 * bound


def test_micro_batches_within_accumulated_batches_keep_what_accumulation_means(dataset: Dataset) -> None:
    """grad_accumulation_steps still averages its batches' mean gradients; each batch may be split."""
    loss_a, after_a, _ = one_step(dataset, 1, accumulation=2)
    loss_b, after_b, _ = one_step(dataset, 2, accumulation=2)
    plan = PackPlan(dataset, ROWS, WIDTH, seed=3, max_seq_length=WIDTH)
    batches = [batch.arrays() for (_epoch, _index, batch), _ in zip(plan.iterate(), range(2), strict=False)]
    first, second = (gradient(fresh_model(), packed_loss, b) for b in batches)
    expected = (first + second) / 2
    before = np.concatenate([np.array(v).astype(np.float64).ravel() for _, v in tree_flatten(fresh_model().trainable_parameters())])
    error = max(float32_error(fresh_model(), packed_loss, b, g) for b, g in zip(batches, (first, second), strict=True))
    # As above, and the average of two gradients rounds once more per element.
    bound = 2 * error + 4 * F32_EPS * float(np.linalg.norm(expected))
    assert np.linalg.norm(after_a - before + expected) <= bound
    assert np.linalg.norm(after_b - before + expected) <= bound
    config = json.loads((embedded_model_path() / "config.json").read_text())
    assert loss_b == pytest.approx(loss_a, rel=forward_rtol(config, WIDTH) + 4 * ROWS * WIDTH * F32_EPS)


def test_split_rows_keeps_every_row_once_in_order() -> None:
    from tunetop.training.data import Batch

    batch = Batch(np.arange(7 * 3).reshape(7, 3), np.zeros((7, 2), dtype=np.int32))
    for parts in (1, 2, 3, 7, 9):
        blocks = split_rows(batch, parts)
        assert len(blocks) == min(parts, 7)
        assert np.array_equal(np.concatenate([b.tokens for b in blocks]), batch.tokens)
        assert max(len(b.tokens) for b in blocks) - min(len(b.tokens) for b in blocks) <= 1
