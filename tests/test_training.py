"""Real MLX training on the embedded model: the loss falls, adapters load in mlx-lm, STOP stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine import config
from engine.data import BatchPlan, Dataset, Example
from engine.session import build_trainer
from engine.trainer import (
    Disposition,
    Save,
    Train,
    Validation,
    default_loss,
    evaluate,
    grad_checkpoint,
    run_loop,
)
from tests.numerics import float32_error, gradient, sum_rtol


def make_cfg(**training: Any) -> config.RunConfig:
    cfg = config.parse(config.starter_text())
    cfg.lora.rank = 4
    cfg.training.batch_size = 4
    cfg.training.validation_batches = 0
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def test_loss_decreases(tmp_path: Path) -> None:
    cfg = make_cfg(iterations=80, steps_per_report=10, steps_per_eval=80)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    events: list[Any] = []
    result = run_loop(trainer, events.append)
    validations = [e.loss for e in events if isinstance(e, Validation)]
    trains = [e for e in events if isinstance(e, Train)]
    assert result.iteration == 80 and result.reason == "completed"
    assert len(validations) == 2  # before the first step and at the end
    assert validations[-1] < 0.5 * validations[0], validations
    assert [t.iteration for t in trains] == list(range(10, 81, 10))
    assert all(t.tokens_per_second > 0 and t.trained_tokens > 0 for t in trains)
    assert trains[-1].trained_tokens == trainer.trained_tokens


def test_adapter_round_trips_into_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm import load

    cfg = make_cfg(iterations=15, steps_per_report=5, steps_per_eval=100)
    trainer, model_path, *_ = build_trainer(cfg, tmp_path / "adapters")
    events: list[Any] = []
    run_loop(trainer, events.append)
    saves = [e for e in events if isinstance(e, Save)]
    assert saves and saves[-1].iteration == 15
    assert (tmp_path / "adapters" / "adapter_config.json").exists()
    assert (tmp_path / "adapters" / "0000015_adapters.safetensors").exists()

    tokens = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])
    trainer.model.eval()
    ours = trainer.model(tokens)
    theirs_model, _ = load(model_path, adapter_path=str(tmp_path / "adapters"))
    theirs = theirs_model(tokens)
    base_model, _ = load(model_path)
    base = base_model(tokens)
    # Exactly equal by construction: mlx-lm's own LoRA layers, the same float32 weights (saved and
    # loaded bit for bit), the same operations in the same process.
    assert np.array_equal(np.array(ours), np.array(theirs))
    # The adapter changed the logits by far more than float32 rounding could (it moves them by ~1).
    assert np.abs(np.array(ours) - np.array(base)).max() > 1e-2


def test_stop_ends_the_run_after_the_report_that_returned_it(tmp_path: Path) -> None:
    cfg = make_cfg(iterations=100, steps_per_report=5, steps_per_eval=1000)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    seen: list[Any] = []

    def progress(event: Any) -> Disposition:
        seen.append(event)
        if isinstance(event, Train) and event.iteration == 15:
            return Disposition.STOP
        return Disposition.MORE

    result = run_loop(trainer, progress)
    assert result.reason == "stopped" and result.iteration == 15 and trainer.iteration == 15
    assert [type(e).__name__ for e in seen[-2:]] == ["Train", "Save"]  # only the final save after STOP
    assert seen[-1].iteration == 15


def test_default_loss_masks_prompt_and_padding() -> None:
    mx.random.seed(0)
    model = nn.Embedding(16, 16)  # a "model" whose logits are easy to reproduce

    tokens = np.array([[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 11, 12]], dtype=np.int32)
    lengths = np.array([[2, 5], [0, 7]], dtype=np.int32)  # row 0: prompt of 2, 5 real tokens
    loss, count = default_loss(model, mx.array(tokens), mx.array(lengths))
    logits = np.array(model(mx.array(tokens[:, :-1]))).astype(np.float64)  # the reference in float64
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picks = []
    for row, (offset, length) in enumerate(lengths):
        for t in range(tokens.shape[1] - 1):
            if max(offset, 1) <= t + 1 < length:
                picks.append(-logp[row, t, tokens[row, t + 1]])
    assert int(count.item()) == len(picks) == 3 + 6
    # float32 rounds a log-sum-exp over the 16 logits and a mean of the 9 counted terms.
    assert loss.item() == pytest.approx(float(np.mean(picks)), rel=sum_rtol(16 + 9))


def test_evaluate_with_zero_batches_covers_every_example(tmp_path: Path) -> None:
    mx.random.seed(0)
    model = nn.Embedding(32, 32)
    rng = np.random.default_rng(0)
    examples = [Example([int(x) for x in rng.integers(1, 32, size=int(n))]) for n in rng.integers(3, 20, size=23)]
    dataset = Dataset(examples, "synthetic")
    value = evaluate(model, dataset, batch_size=5, batch_count=0)
    total = sum(default_loss(model, mx.array([e.tokens]), mx.array([[0, len(e.tokens)]]))[0].item() * (len(e.tokens) - 1) for e in examples)
    count = sum(len(e.tokens) - 1 for e in examples)
    # The same per-token losses summed in other orders (per batch, then over batches; per
    # example): float32 sums of at most ``count`` terms in all (tests/numerics.py).
    assert value == pytest.approx(total / count, rel=sum_rtol(count))
    assert len(BatchPlan(dataset, 5, 2048, drop_last=False)) == 5  # 23 examples: 4 full batches + a tail of 3


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_other_fine_tune_types_train_and_load(tmp_path: Path, kind: str) -> None:
    from mlx_lm import load

    cfg = make_cfg(iterations=4, steps_per_report=2, steps_per_eval=100)
    cfg.lora.fine_tune_type = kind
    cfg.lora.num_layers = 2
    trainer, model_path, trainable, total = build_trainer(cfg, tmp_path / "adapters")
    run_loop(trainer)
    assert 0 < trainable < total
    tokens = mx.array([[5, 17, 42, 99]])
    trainer.model.eval()
    theirs, _ = load(model_path, adapter_path=str(tmp_path / "adapters"))
    # Exactly equal: mlx-lm's own layers and the same float32 weights, as in the LoRA test above.
    assert np.array_equal(np.array(trainer.model(tokens)), np.array(theirs(tokens)))


def test_gradient_accumulation_counts_every_micro_batch(tmp_path: Path) -> None:
    cfg = make_cfg(iterations=3, steps_per_report=1, steps_per_eval=100, grad_accumulation_steps=2)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    run_loop(trainer)
    assert trainer.iteration == 3 and trainer.position == 6  # two batches per optimizer step


def test_skip_policy_undoes_nonfinite_updates(tmp_path: Path) -> None:
    from engine.trainer import NonFinite

    cfg = make_cfg(iterations=12, steps_per_report=1, steps_per_eval=1000, on_nonfinite="skip")
    cfg.optimizer.name = "sgd"
    cfg.optimizer.learning_rate = 1e30  # the weights blow up within a step or two
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    events: list[Any] = []
    result = run_loop(trainer, events.append)
    skipped = [e for e in events if isinstance(e, NonFinite)]
    assert skipped and all(e.action == "skipped" for e in skipped[:-1])
    # Every step after the first breaks: after nonfinite_streak_limit in a row skipping gives up
    # (a pause; without a control hook, the end of the run).
    limit = trainer.parameters.nonfinite_streak_limit
    assert skipped[-1].action == "pause" and skipped[-1].streak == limit
    assert result.reason == "non_finite" and trainer.iteration == 1 + limit
    assert trainer.weights_finite()  # every non-finite update was undone
    assert all(bool(mx.all(mx.isfinite(v)).item()) for _, v in tree_flatten(trainer.optimizer.state) if isinstance(v, mx.array))


def test_qlora_trains_on_a_4bit_base_and_loads_in_mlx_lm(tmp_path: Path) -> None:
    """QLoRA: LoRA on a model quantized to 4 bits with mlx-lm's own convert."""
    from mlx_lm import convert, load

    from engine.demo import embedded_model_path

    quantized = tmp_path / "q4"
    convert(str(embedded_model_path()), mlx_path=str(quantized), quantize=True, q_bits=4, q_group_size=32)
    # 20 steps take the validation loss from 11.0 to 3.6 (4-bit steps are slow on a busy CPU).
    cfg = make_cfg(iterations=20, steps_per_report=10, steps_per_eval=20)
    cfg.model.path = str(quantized)
    trainer, model_path, trainable, total = build_trainer(cfg, tmp_path / "adapters")
    q_proj = trainer.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear) and q_proj.linear.bits == 4
    events: list[Any] = []
    run_loop(trainer, events.append)
    validations = [e.loss for e in events if isinstance(e, Validation)]
    assert validations[-1] < 0.8 * validations[0], validations
    assert all(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(trainer.model.trainable_parameters()))

    tokens = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])
    trainer.model.eval()
    theirs, _ = load(model_path, adapter_path=str(tmp_path / "adapters"))
    assert isinstance(theirs.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    # Exactly equal: the same quantized weights and LoRA layers, the same operations.
    assert np.array_equal(np.array(trainer.model(tokens)), np.array(theirs(tokens)))


@pytest.mark.parametrize("threshold", [-1.0, 0.0])
def test_clear_cache_gb_empties_the_buffer_cache_after_a_step(tmp_path: Path, threshold: float) -> None:
    cfg = make_cfg(clear_cache_gb=threshold)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    for _ in range(3):
        trainer.step()
    if threshold < 0:
        assert mx.get_cache_memory() > 100_000  # the control: MLX keeps freed buffers for the next step
    else:
        assert mx.get_cache_memory() < 1024  # the step's own scalars (loss, count) are freed after it returns


@pytest.mark.parametrize("blocks", [-1, 1])
def test_grad_checkpoint_trains_packed_rows_exactly_as_without(tmp_path: Path, blocks: int) -> None:
    """Recomputing blocks in the backward pass changes memory, not the numbers; the packed block
    mask (an array argument of every block) is a constant, not differentiated. Only the chosen
    blocks recompute, under their own parameter names, and nothing outside this model changes."""
    from mlx_lm.models.llama import TransformerBlock

    original = TransformerBlock.__call__
    trainers, names = [], []
    for checkpoint in (False, True):
        cfg = make_cfg(grad_checkpoint=checkpoint, grad_checkpoint_blocks=blocks, iterations=4)
        cfg.data.packing = "on"
        trainer, *_ = build_trainer(cfg, tmp_path / f"adapters-{checkpoint}")
        assert trainer.parameters.pack_width > 0
        names.append([k for k, _ in tree_flatten(trainer.model.trainable_parameters())])
        trainers.append(trainer)
    plain, recomputing = trainers
    layers = recomputing.model.layers  # type: ignore[attr-defined]
    flags = [getattr(layer, "recomputes_activations", False) for layer in layers]
    assert flags == [True] * len(layers) if blocks == -1 else [True] + [False] * (len(layers) - 1)
    assert not any(getattr(layer, "recomputes_activations", False) for layer in plain.model.layers)  # type: ignore[attr-defined]
    assert all(isinstance(layer, TransformerBlock) for layer in layers)
    assert TransformerBlock.__call__ is original  # the class itself is not patched
    kind = type(layers[0])
    assert grad_checkpoint(recomputing.model, blocks) == sum(flags)
    assert type(layers[0]) is kind  # a second call does not wrap again
    assert names[1] == names[0]

    # Same weights, same packed batches: each step compares the two from equal weights, so
    # rounding differences never compound from step to step (Adam would amplify them: its first
    # update is lr * sign(gradient), and a near-zero component can flip sign).
    for _ in range(3):
        recomputing.model.update(plain.model.trainable_parameters())
        batch = plain.next_batch()
        assert np.array_equal(recomputing.next_batch().tokens, batch.tokens)
        arrays = batch.arrays()
        expected = gradient(plain.model, plain.train_loss, arrays)
        # Recomputing changes the order of some sums (seen: 2e-5 relative in the attention
        # projections, where the softmax's backward pass cancels), and so the rounding; the
        # bound is float32's own error on this gradient on this CPU (tests/numerics.py).
        bound = 2 * float32_error(plain.model, plain.train_loss, arrays, expected)
        assert np.linalg.norm(gradient(recomputing.model, recomputing.train_loss, arrays) - expected) <= bound
        # The compiled training step, from equal weights again: the same forward pass, so the
        # loss (a mean over the batch's tokens) differs by a sum's rounding at most.
        recomputing.model.update(plain.model.trainable_parameters())
        a, b = plain.step(), recomputing.step()
        assert a.tokens == b.tokens and b.loss == pytest.approx(a.loss, rel=sum_rtol(a.tokens))


def test_memory_limit_gb_sets_mlx_soft_memory_cap(tmp_path: Path) -> None:
    previous = mx.get_memory_limit()
    try:
        build_trainer(make_cfg(), tmp_path / "adapters-default")
        assert mx.get_memory_limit() == previous  # 0, the default, leaves MLX's own limit alone
        trainer, *_ = build_trainer(make_cfg(memory_limit_gb=1.5), tmp_path / "adapters")
        assert mx.get_memory_limit() == 1_500_000_000
        # A soft cap: a step that needs more than the cap still runs, only queued less far ahead.
        trainer.parameters.memory_limit_gb = 0.001
        trainer.apply_memory_limit()
        assert trainer.step().tokens > 0 and mx.get_peak_memory() > 1_000_000
        trainer.parameters.memory_limit_gb = 0  # a live ``set memory_limit_gb=0``: MLX's default again
        trainer.apply_memory_limit()
        assert mx.get_memory_limit() == previous
    finally:
        mx.set_memory_limit(previous)


def test_parameter_counts_are_logical_for_quantized_layers(tmp_path: Path) -> None:
    """A quantized model counts the weights its packed words stand for, not the words (issue 22)."""
    from mlx_lm import load

    from engine.adapters import apply_fine_tuning, count_parameters
    from engine.demo import embedded_model_path

    model, _tokenizer = load(str(embedded_model_path()))
    _, full = count_parameters(model)
    assert full == sum(v.size for _, v in tree_flatten(model.parameters()))
    for bits in (4, 8):
        quantized, _ = load(str(embedded_model_path()))
        nn.quantize(quantized, group_size=32, bits=bits)
        assert isinstance(quantized.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert count_parameters(quantized)[1] == full, bits
        cfg = make_cfg()
        apply_fine_tuning(quantized, cfg.lora)
        trainable, total = count_parameters(quantized)
        assert trainable == sum(v.size for _, v in tree_flatten(quantized.trainable_parameters())) > 0
        assert total == full + trainable  # the LoRA weights are parameters of the model too
