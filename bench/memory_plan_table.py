"""engine/training/memory_plan.py against the H200 figures it was calibrated on, and what it picks at a few budgets.

    python bench/memory_plan_table.py

No device needed: the plan is a pure function of the model's shape, the rows of a step and the
budget. The shapes are bench/make_bench_model.py's (Llama-3.2-1B in bf16; Llama-3.1-8B quantized
to 4 bits, 4.52 GB as held), with rank-8 LoRA on every linear layer of the last 16 blocks.
"Peak" is what the plan expects under the cap: the step's need, or where MLX's queueing fills
the cap and a little past it, whichever is more (MemoryPlan.peak).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunetop.training.memory_plan import GB, Fixed, ModelShape, Workload, plan_memory, step_cost  # noqa: E402

LORA_1B = 16 * (2 * 32768 + 2 * 20480 + 3 * 81920)
ONE_B = ModelShape(layers=16, hidden=2048, intermediate=8192, heads=32, vocab=128256, parameters=1_235_814_400 + LORA_1B,
                   weight_bytes=1_235_814_400 * 2 + LORA_1B * 4, trainable_bytes=LORA_1B * 4)
LORA_8B = 10_485_760
EIGHT_B_Q4 = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, vocab=128256, parameters=8_030_261_248 + LORA_8B,
                        weight_bytes=4_520_000_000 + LORA_8B * 4, trainable_bytes=LORA_8B * 4)

# (label, shape, rows, ce_chunk_tokens, recomputing blocks, memory_limit_gb, the H200 figure)
MEASURED = [
    ("1B 8 rows, 14 blocks (old plan)", ONE_B, 8, 0, 14, 19.0, "47.0k tok/s, 19.26 GB"),
    ("1B 8 rows, CE 2048", ONE_B, 8, 2048, 0, 19.0, "51.0k, 37.5"),
    ("1B 8 rows, CE 4096, 4 blocks", ONE_B, 8, 4096, 4, 19.0, "49.7k, 30.7"),
    ("1B 8 rows, CE 2048, 6 blocks", ONE_B, 8, 2048, 6, 19.0, "49.9k, 27.3"),
    ("1B 8 rows, 10 blocks", ONE_B, 8, 0, 10, 19.0, "50.9k, 24.5"),
    ("1B 6 rows, CE 2048, 2 blocks", ONE_B, 6, 2048, 2, 19.0, "49.6k, 26.3"),
    ("1B 4 rows", ONE_B, 4, 0, 0, 19.0, "55.3k, 22.1"),
    ("1B 4 rows, CE 2048", ONE_B, 4, 2048, 0, 19.0, "52.4k, 20.55"),
    ("1B 4 rows, CE 4096, 2 blocks", ONE_B, 4, 4096, 2, 19.0, "51.1k, 20.0"),
    ("8B 2 rows, 28 blocks (old plan)", EIGHT_B_Q4, 2, 0, 28, 15.2, "4,187 tok/s, 15.74 GB"),
    ("8B 2 rows, 18 blocks (old plan)", EIGHT_B_Q4, 2, 0, 18, 22.8, "4,825, 22.91"),
    ("1B 4 rows, CE 2048, 8 blocks", ONE_B, 4, 2048, 8, 15.0, "47.5k, 15.49 (memory-sweep)"),
    ("1B 8 rows, CE 2048, all blocks", ONE_B, 8, 2048, 16, 15.0, "44.1k, 15.52 (memory-sweep)"),
]


def main() -> None:
    print("Capped H200 runs (packed rows of 2048, one pass): the plan's estimate with the same settings")
    print(f"{'step':<34} {'cap':>5} {'need':>6} {'peak':>6} {'time':>6}  H200")
    for label, shape, rows, ce, blocks, cap, measured in MEASURED:
        work = Workload(rows=rows, width=2048, packed=True)
        plan = plan_memory(shape, work, cap / 0.95 * GB, True, Fixed(cap, ce, blocks, 1))
        print(f"{label:<34} {cap:>5g} {plan.need.total / GB:>6.1f} {plan.peak / GB:>6.1f} {plan.cost:>6.3f}  {measured}")
    print()
    print("What the plan picks (time: the step's estimated time against one pass with nothing given up)")
    print(f"{'budget GB':>9}  {'step':<20} plan")
    for budget in (15.5, 16, 20, 24, 40, 80):
        for label, shape, rows in (("1B, 4 x 2048", ONE_B, 4), ("1B, 8 x 2048", ONE_B, 8), ("8B 4-bit, 2 x 2048", EIGHT_B_Q4, 2)):
            work = Workload(rows=rows, width=2048, packed=True)
            plan = plan_memory(shape, work, budget * GB, cap_applies=True)
            print(f"{budget:>9g}  {label:<20} {plan.describe().split('; a step')[0]}; needs {plan.need.total / GB:.1f} GB, "
                  f"peak {plan.peak / GB:.1f} GB, time {plan.cost:.3f}")
    print()
    print("The runs bench/h200.sh part budget makes, against the previous plan's choice")
    for label, shape, rows, budget, old_blocks, old_speed in (
        ("budget-1b-20", ONE_B, 8, 20, 14, 47.0e3), ("budget-8b-16", EIGHT_B_Q4, 2, 16, 28, 4187),
        ("budget-8b-24", EIGHT_B_Q4, 2, 24, 18, 4825),
    ):
        work = Workload(rows=rows, width=2048, packed=True)
        plan = plan_memory(shape, work, budget * GB, cap_applies=True)
        old = step_cost(shape, work, 0, old_blocks)
        print(f"{label}: {plan.describe().split('; a step')[0]}; expected ~{old_speed * old / plan.cost:,.0f} tok/s "
              f"(previous plan: {old_blocks} blocks, one pass, {old_speed:,.0f} measured), peak at most {plan.peak / GB:.1f} GB")


if __name__ == "__main__":
    main()
