"""training.memory_budget_gb: the pure plan (tunetop.training.memory_plan) and the engine applying it (issue 22)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from tunetop.training import config
from tunetop.training.memory_plan import GB, Fixed, ModelShape, Workload, plan_memory, step_need

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


def need_gb(shape: ModelShape, work: Workload, ce: int = 0, blocks: int = 0) -> float:
    return step_need(shape, work, ce, blocks).total / GB


def test_the_estimate_follows_the_h200_figures() -> None:
    """docs/PERFORMANCE.md, the 1B shape on the H200: what a step needs with each setting."""
    fixed512, four, eight = Workload(rows=8, width=512), Workload(rows=4, width=2048, packed=True), Workload(rows=8, width=2048, packed=True)
    assert 12.0 <= need_gb(ONE_B, fixed512) <= 14.5  # "against 13 GB of real need"; capped at 13 GB: 13.05-13.71
    assert 21.0 <= need_gb(ONE_B, four) <= 23.5  # capped at 15 GB it still peaked at 22.09: "about 20 GB with full logits"
    assert 19.0 <= need_gb(ONE_B, four, 2048) <= 21.5  # 20.03 at a 15 GB cap
    assert need_gb(ONE_B, four, 2048) < need_gb(ONE_B, four)
    # Both fit a 15 GB cap (15.49 and 15.46 GB peaks): 6 blocks barely, 8 easily.
    assert need_gb(ONE_B, four, 2048, 8) <= 15.0 and need_gb(ONE_B, four, 2048, 6) <= 15.6
    assert need_gb(ONE_B, eight, 2048, 16) <= 15.0  # 8 rows, every block recomputing: 15.52 at a 15 GB cap
    assert need_gb(ONE_B, eight) <= 49.6  # the starter-like 8 x 2048, uncapped: 49.6 GB (the queue ahead included)
    assert need_gb(EIGHT_B_Q4, Workload(rows=2, width=2048, packed=True), 0, 32) <= 15.5  # QLoRA, every block: 15.5 GB


def test_the_plan_picks_the_h200_settings() -> None:
    """At the budgets the H200 runs used, the settings that fitted there."""
    plan = plan_memory(ONE_B, Workload(rows=8, width=2048, packed=True), 15.5 * GB, cap_applies=True)
    assert (plan.ce_chunk_tokens, plan.recompute_blocks) == (2048, 16) and plan.fits  # as the 15.52 GB run
    plan = plan_memory(ONE_B, Workload(rows=4, width=2048, packed=True), 15.5 * GB, cap_applies=True)
    assert 6 <= plan.recompute_blocks <= 12 and plan.memory_limit_gb <= 15.5 and plan.fits
    plan = plan_memory(ONE_B, Workload(rows=8, width=512), 20 * GB, cap_applies=True)
    assert (plan.ce_chunk_tokens, plan.recompute_blocks) == (0, 0)  # 13 GB fits 20 as it is
    assert 15 <= plan.memory_limit_gb <= 20


@pytest.mark.parametrize("shape, work", CASES)
def test_a_tighter_budget_never_recomputes_or_chunks_less(shape: ModelShape, work: Workload) -> None:
    plans = [plan_memory(shape, work, gb * GB, cap_applies=work.fused_attention) for gb in BUDGETS_GB]
    for looser, tighter in zip(plans[1:], plans[:-1], strict=True):
        assert tighter.recompute_blocks >= looser.recompute_blocks
        assert bool(tighter.ce_chunk_tokens) >= bool(looser.ce_chunk_tokens)
        assert tighter.memory_limit_gb <= looser.memory_limit_gb
        assert tighter.need.total <= looser.need.total + 1  # leaner settings, no larger estimate
    # The range covers both ends: nothing needed at the top, the leanest rung at the bottom.
    assert (plans[-1].recompute_blocks, plans[-1].ce_chunk_tokens) == (0, 0)
    assert plans[0].recompute_blocks == shape.layers
    assert len({(p.recompute_blocks, p.ce_chunk_tokens) for p in plans}) > 2


@pytest.mark.parametrize("shape, work", CASES)
def test_no_setting_needs_more_than_the_budget_when_one_fits(shape: ModelShape, work: Workload) -> None:
    leanest = min(step_need(shape, work, ce, k).total for ce in (0, 2048) for k in range(shape.layers + 1))
    for gb in BUDGETS_GB:
        plan = plan_memory(shape, work, gb * GB, cap_applies=True)
        assert plan.memory_limit_gb <= gb
        if leanest <= gb * GB * 0.9:  # the plan keeps a step under 95% of a cap 5% under the budget
            assert plan.fits and plan.need.total <= gb * GB, (gb, plan.describe())
        else:
            assert not plan.fits and "nothing fits" in plan.reasons[-1]
        if plan.recompute_blocks or plan.ce_chunk_tokens:  # something was given up: the fastest did not fit
            assert step_need(shape, work).total > gb * GB * 0.9


def test_settings_the_config_gives_are_kept() -> None:
    four = Workload(rows=4, width=2048, packed=True)
    tight = 10 * GB
    plan = plan_memory(ONE_B, four, tight, True, Fixed(memory_limit_gb=30.0))
    assert plan.memory_limit_gb == 30.0 and plan.recompute_blocks > 0  # the cap is theirs; the rest still fits the budget
    plan = plan_memory(ONE_B, four, tight, True, Fixed(ce_chunk_tokens=4096))
    assert plan.ce_chunk_tokens == 4096 and plan.recompute_blocks > 0
    for blocks in (0, 3):
        plan = plan_memory(ONE_B, four, tight, True, Fixed(recompute_blocks=blocks))
        assert plan.recompute_blocks == blocks and plan.ce_chunk_tokens == 2048  # chunking is all that is left to choose
    plan = plan_memory(ONE_B, four, tight, True, Fixed(memory_limit_gb=12.0, ce_chunk_tokens=1024, recompute_blocks=2))
    assert (plan.memory_limit_gb, plan.ce_chunk_tokens, plan.recompute_blocks) == (12.0, 1024, 2)
    assert not plan.fits and "as the config sets" in " ".join(plan.reasons)


def test_a_cpu_gets_no_cap_and_chunking_only_when_it_saves_memory() -> None:
    small = Workload(rows=8, width=128, fused_attention=False)
    plan = plan_memory(SMALL, small, 16 * GB, cap_applies=False)
    assert (plan.memory_limit_gb, plan.ce_chunk_tokens, plan.recompute_blocks) == (0.0, 0, 0)
    assert "no memory cap" in plan.describe()
    plan = plan_memory(SMALL, small, 0.01 * GB, cap_applies=False)
    assert plan.memory_limit_gb == 0.0 and plan.recompute_blocks == SMALL.layers
    assert plan.ce_chunk_tokens == 0  # 1,024 positions: a 2,048-token chunk is the whole logits


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
