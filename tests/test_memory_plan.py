"""training.memory_budget_gb: the pure plan (tunetop.training.memory_plan) and the engine applying it (issue 22)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from tunetop.training import config
from tunetop.training.memory_plan import GB, Fixed, ModelShape, Workload, plan_memory, step_cost, step_need

# Llama-3.2-1B's shape in bf16 with rank-8 LoRA on every linear layer of its 16 blocks (bench/make_bench_model.py).
LORA_1B = 16 * (2 * 32768 + 2 * 20480 + 3 * 81920)
ONE_B = ModelShape(layers=16, hidden=2048, intermediate=8192, heads=32, vocab=128256, parameters=1_235_814_400 + LORA_1B,
                   weight_bytes=1_235_814_400 * 2 + LORA_1B * 4, trainable_bytes=LORA_1B * 4)
# Llama-3.1-8B quantized to 4 bits (4.5 GB of packed weights and scales), LoRA as mlx-lm's default.
LORA_8B = 10_485_760
EIGHT_B_Q4 = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, vocab=128256, parameters=8_030_261_248 + LORA_8B,
                        weight_bytes=4_520_000_000 + LORA_8B * 4, trainable_bytes=LORA_8B * 4)
# A small model in float32 on a CPU (unfused attention keeps its scores).
SMALL = ModelShape(layers=4, hidden=256, intermediate=1024, heads=4, vocab=4096, parameters=5_000_000,
                   weight_bytes=20_000_000, trainable_bytes=400_000, activation_bytes=4)

CASES = [
    (ONE_B, Workload(rows=8, width=512)),
    (ONE_B, Workload(rows=4, width=2048, packed=True)),
    (ONE_B, Workload(rows=8, width=2048, packed=True)),
    (EIGHT_B_Q4, Workload(rows=2, width=2048, packed=True)),
    (SMALL, Workload(rows=8, width=512, fused_attention=False)),
]
BUDGETS_GB = [0.05 * 1.25**i for i in range(45)]  # 0.05 GB to about 1,000 GB


def need_gb(shape: ModelShape, work: Workload, ce: int = 0, blocks: int = 0, micro: int = 1) -> float:
    return step_need(shape, work, ce, blocks, micro).total / GB


# H200 peaks under a cap (GB), mlx 0.32.4 CUDA, packed rows of 2048 unless said: (shape, rows, width, packed,
# ce_chunk_tokens, recomputing blocks, memory_limit_gb, peak). The lead's runs of 2026-11-29 first, then
# docs/PERFORMANCE.md's memory sweep. Uncapped peaks (49.6 GB at 8 rows, 28.4 at 4) are left out: they hold
# what MLX queues ahead of the device, which the plan's cap bounds, not the step's need.
MEASURED = [
    (ONE_B, 8, 2048, True, 0, 14, 19.0, 19.26),  # the previous plan at a 20 GB budget: 47.0k tok/s
    (ONE_B, 8, 2048, True, 2048, 0, 19.0, 37.5),
    (ONE_B, 8, 2048, True, 4096, 4, 19.0, 30.7),
    (ONE_B, 8, 2048, True, 2048, 6, 19.0, 27.3),
    (ONE_B, 8, 2048, True, 0, 10, 19.0, 24.5),
    (ONE_B, 6, 2048, True, 2048, 2, 19.0, 26.3),
    (ONE_B, 4, 2048, True, 0, 0, 19.0, 22.1),
    (ONE_B, 4, 2048, True, 2048, 0, 19.0, 20.55),
    (ONE_B, 4, 2048, True, 4096, 2, 19.0, 20.0),
    (EIGHT_B_Q4, 2, 2048, True, 0, 28, 15.2, 15.74),  # the previous plan at 16 GB: 4,187 tok/s
    (EIGHT_B_Q4, 2, 2048, True, 0, 18, 22.8, 22.91),  # and at 24 GB: 4,825 tok/s
    (ONE_B, 4, 2048, True, 0, 0, 15.0, 22.09),
    (ONE_B, 4, 2048, True, 2048, 0, 15.0, 20.03),
    (ONE_B, 4, 2048, True, 2048, 8, 15.0, 15.49),
    (ONE_B, 4, 2048, True, 2048, 6, 15.0, 15.46),
    (ONE_B, 8, 2048, True, 2048, 16, 15.0, 15.52),
    (ONE_B, 8, 512, False, 0, 0, 13.0, 13.71),  # fixed 512-token rows; 13.05 in a second run
]


@pytest.mark.parametrize("shape, rows, width, packed, ce, blocks, cap, peak", MEASURED)
def test_the_estimate_is_at_or_above_every_measured_peak(
    shape: ModelShape, rows: int, width: int, packed: bool, ce: int, blocks: int, cap: float, peak: float
) -> None:
    """A capped step peaks at its need or, when it needs less, where MLX's queueing fills the cap (a
    little past it): 15.46-15.52 GB at a 15 GB cap for steps needing anywhere from 12 to 16."""
    work = Workload(rows=rows, width=width, packed=packed)
    plan = plan_memory(shape, work, cap / 0.95 * GB, True, Fixed(cap, ce, blocks, 1))
    assert (plan.memory_limit_gb, plan.ce_chunk_tokens, plan.recompute_blocks, plan.micro_batches) == (cap, ce, blocks, 1)
    assert plan.peak / GB >= peak, plan.describe()
    if peak > cap * 1.1:  # the step's own need, well past the cap: estimated, not just bounded
        assert plan.need.total / GB <= peak * 1.15, plan.describe()


def test_the_estimate_follows_the_h200_figures() -> None:
    """The shape of the estimate: what each measure saves, on the 1B shape's packed rows."""
    four, eight = Workload(rows=4, width=2048, packed=True), Workload(rows=8, width=2048, packed=True)
    assert need_gb(ONE_B, four, 2048) < need_gb(ONE_B, four)
    assert need_gb(ONE_B, four, 0, 8) < need_gb(ONE_B, four, 0, 6) < need_gb(ONE_B, four)
    # Two micro-batches of 4 rows need what one pass of 4 rows needs, and one more set of gradients.
    assert need_gb(ONE_B, eight, 0, 0, 2) == pytest.approx(need_gb(ONE_B, four) + ONE_B.trainable_bytes * 1.07 / GB)
    assert need_gb(ONE_B, eight, 0, 0, 2) < need_gb(ONE_B, eight) - 15


def test_the_plan_splits_before_it_recomputes_where_the_h200_says_so() -> None:
    """Under a 19 GB cap, 8 rows with 14 of 16 blocks recomputing ran at 47.0k tok/s; 4 rows at 51-55k.
    On the 8B shape (4-bit) every recomputing block costs twice as much as on the 1B."""
    eight = Workload(rows=8, width=2048, packed=True)
    plan = plan_memory(ONE_B, eight, 20 * GB, cap_applies=True)
    assert plan.micro_batches == 2 and plan.recompute_blocks < 14 and plan.fits
    assert plan.cost < step_cost(ONE_B, eight, 0, 14)  # faster than the previous plan, as estimated
    assert plan.peak <= 20 * GB and "2 micro-batches of 4 rows" in plan.describe()
    two = Workload(rows=2, width=2048, packed=True)
    for budget, before in ((16, 28), (24, 18)):  # the previous plan's blocks at these budgets
        plan = plan_memory(EIGHT_B_Q4, two, budget * GB, cap_applies=True)
        assert plan.micro_batches == 2 and plan.recompute_blocks < before and plan.fits, plan.describe()
        assert plan.cost < step_cost(EIGHT_B_Q4, two, 0, before) and plan.peak <= budget * GB
    # Where the whole step fits, nothing is given up: one pass.
    plan = plan_memory(ONE_B, Workload(rows=8, width=512), 20 * GB, cap_applies=True)
    assert (plan.micro_batches, plan.ce_chunk_tokens, plan.recompute_blocks) == (1, 0, 0)
    assert 15 <= plan.memory_limit_gb <= 20


@pytest.mark.parametrize("shape, work", CASES)
def test_a_tighter_budget_never_gets_a_faster_or_larger_step(shape: ModelShape, work: Workload) -> None:
    plans = [plan_memory(shape, work, gb * GB, cap_applies=work.fused_attention) for gb in BUDGETS_GB]
    for looser, tighter in zip(plans[1:], plans[:-1], strict=True):
        assert tighter.cost >= looser.cost
        assert tighter.need.total <= looser.need.total
        assert tighter.memory_limit_gb <= looser.memory_limit_gb
    # The range covers both ends: nothing given up at the top, the leanest settings at the bottom.
    assert (plans[-1].micro_batches, plans[-1].recompute_blocks, plans[-1].ce_chunk_tokens) == (1, 0, 0)
    leanest = min(step_need(shape, work, ce, k, m).total for ce in (0, 2048) for k in range(shape.layers + 1)
                  for m in range(1, work.rows + 1) if work.rows % m == 0)
    assert plans[0].need.total == leanest
    assert len({(p.micro_batches, p.recompute_blocks, p.ce_chunk_tokens) for p in plans}) > 2


@pytest.mark.parametrize("shape, work", CASES)
def test_no_setting_needs_more_than_the_budget_when_one_fits(shape: ModelShape, work: Workload) -> None:
    leanest = min(step_need(shape, work, ce, k, m).total for ce in (0, 2048) for k in range(shape.layers + 1)
                  for m in range(1, work.rows + 1) if work.rows % m == 0)
    for gb in BUDGETS_GB:
        plan = plan_memory(shape, work, gb * GB, cap_applies=True)
        assert plan.memory_limit_gb <= gb
        if leanest <= gb * GB * 0.9:  # the plan keeps a step under 95% of a cap 5% under the budget
            assert plan.fits and plan.need.total <= gb * GB and plan.peak <= gb * GB, (gb, plan.describe())
        else:
            assert not plan.fits and "nothing fits" in plan.reasons[-1]
        if plan.micro_batches > 1 or plan.recompute_blocks or plan.ce_chunk_tokens:  # the fastest did not fit
            assert step_need(shape, work).total > gb * GB * 0.9


def test_settings_the_config_gives_are_kept() -> None:
    four = Workload(rows=4, width=2048, packed=True)
    tight = 10 * GB
    plan = plan_memory(ONE_B, four, tight, True, Fixed(memory_limit_gb=30.0))
    assert plan.memory_limit_gb == 30.0 and plan.fits  # the cap is theirs; the rest still fits the budget
    plan = plan_memory(ONE_B, four, tight, True, Fixed(ce_chunk_tokens=4096))
    assert plan.ce_chunk_tokens == 4096 and plan.fits
    for blocks in (0, 3):
        plan = plan_memory(ONE_B, four, tight, True, Fixed(recompute_blocks=blocks))
        assert plan.recompute_blocks == blocks and (plan.micro_batches > 1 or plan.ce_chunk_tokens)  # the rest chosen around it
    plan = plan_memory(ONE_B, four, tight, True, Fixed(micro_batches=1))
    assert plan.micro_batches == 1 and plan.recompute_blocks > 0 and plan.fits
    plan = plan_memory(ONE_B, four, tight, True, Fixed(micro_batches=3))  # need not divide the rows
    assert plan.micro_batches == 3 and "3 micro-batches of up to 2 rows" in plan.describe()
    plan = plan_memory(ONE_B, four, tight, True, Fixed(12.0, 1024, 2, 1))
    assert (plan.memory_limit_gb, plan.ce_chunk_tokens, plan.recompute_blocks, plan.micro_batches) == (12.0, 1024, 2, 1)
    assert not plan.fits and "as the config sets" in " ".join(plan.reasons)


def test_a_cpu_gets_no_cap_and_chunking_only_when_it_saves_memory() -> None:
    small = Workload(rows=8, width=128, fused_attention=False)
    plan = plan_memory(SMALL, small, 16 * GB, cap_applies=False)
    assert (plan.memory_limit_gb, plan.ce_chunk_tokens, plan.recompute_blocks, plan.micro_batches) == (0.0, 0, 0, 1)
    assert "no memory cap" in plan.describe() and plan.peak == plan.need.total
    plan = plan_memory(SMALL, small, 0.01 * GB, cap_applies=False)
    assert plan.memory_limit_gb == 0.0 and plan.recompute_blocks == SMALL.layers and plan.micro_batches == 8
    assert plan.ce_chunk_tokens == 0  # 128 positions a pass: a 2,048-token chunk is the whole logits


def test_memory_budget_gb_in_the_config() -> None:
    assert config.parse("").training.memory_budget_gb == "auto"
    assert config.parse("[training]\nmemory_budget_gb = 20").training.memory_budget_gb == 20.0
    assert config.parse('[training]\nmemory_budget_gb = "auto"').training.memory_budget_gb == "auto"
    assert 'memory_budget_gb = "auto"' in config.starter_text()
    for bad, says in (('"lots"', '"auto" or a number'), ("-1", "between 0.0 and"), ("true", '"auto" or a number'),
                      ("1" + "0" * 400, '"auto" or a number')):
        with pytest.raises(config.ConfigError) as error:
            config.parse(f"[training]\nmemory_budget_gb = {bad}", source="run.toml")
        assert "run.toml:2" in str(error.value) and "training.memory_budget_gb" in str(error.value) and says in str(error.value)
    assert "training.memory_budget_gb" not in config.computation_values(config.parse(""))  # a resume may change it


def _build(tmp_path: Path, lines: list[str], **training: object) -> object:
    from tunetop.training.build import build_trainer

    cfg = config.parse(config.starter_text())
    cfg.training.batch_size = 4
    for key, value in training.items():
        setattr(cfg.training, key, value)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters", report=lines.append)
    return trainer


def test_the_engine_plans_at_start_and_says_so(tmp_path: Path) -> None:
    """The embedded model on this CPU: 'auto' is a share of the RAM, which it needs none of; a tiny budget recomputes."""
    previous = mx.get_memory_limit()
    try:
        lines: list[str] = []
        trainer = _build(tmp_path / "auto", lines)
        said = [line for line in lines if line.startswith("memory budget")]
        assert len(said) == 1 and "RAM available, no GPU" in said[0] and "no memory cap" in said[0], lines
        assert "no block recomputes" in said[0] and "full logits" in said[0]
        assert mx.get_memory_limit() == previous
        assert not any(getattr(type(layer), "recomputes_activations", False) for layer in trainer.model.layers)  # type: ignore[attr-defined]

        lines = []
        trainer = _build(tmp_path / "tight", lines, memory_budget_gb=0.008)  # the leanest step (~13 MB) within 2x of it
        layers = trainer.model.layers  # type: ignore[attr-defined]
        assert all(getattr(type(layer), "recomputes_activations", False) for layer in layers)
        assert any(f"{len(layers)} of {len(layers)} blocks recompute" in line and "nothing fits" not in line or
                   "more than the budget" in line for line in lines), lines
        # One row a pass: the trainer takes the plan's micro-batches, and its step trains on all the rows.
        assert any("4 micro-batches of 1 row" in line for line in lines), lines
        assert trainer.parameters.micro_batches == 4  # type: ignore[attr-defined]
        assert trainer.step().tokens > 0  # type: ignore[attr-defined]
        lines = []
        trainer = _build(tmp_path / "one pass", lines, memory_budget_gb=0.008, micro_batches=1)  # as set, it wins
        assert trainer.parameters.micro_batches == 1  # type: ignore[attr-defined]
        assert any(line.startswith("memory budget") and "one pass of 4 rows" in line for line in lines), lines

        lines = []
        trainer = _build(tmp_path / "explicit", lines, memory_budget_gb=0.015, grad_checkpoint=True, grad_checkpoint_blocks=1)
        flags = [getattr(type(layer), "recomputes_activations", False) for layer in trainer.model.layers]  # type: ignore[attr-defined]
        assert flags == [True] + [False] * (len(flags) - 1)  # grad_checkpoint_blocks as set wins
        trainer = _build(tmp_path / "none", lines, memory_budget_gb=0.015, grad_checkpoint_blocks=0)
        assert not any(getattr(type(layer), "recomputes_activations", False) for layer in trainer.model.layers)  # type: ignore[attr-defined]

        with pytest.raises(config.ConfigError, match=r"more than 2x the memory budget .* training.batch_size"):
            _build(tmp_path / "refused", [], memory_budget_gb=0.001)  # far past what any setting saves: refused at start

        lines = []
        _build(tmp_path / "off", lines, memory_budget_gb=0.0)
        assert not any(line.startswith("memory budget") for line in lines)
    finally:
        mx.set_memory_limit(previous)
