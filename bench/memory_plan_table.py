"""engine/training/memory_plan.py against the H200 figures it was calibrated on, and what it picks at a few budgets.

    python bench/memory_plan_table.py

No device needed: the plan is a pure function of the model's shape, the rows of a step and the
budget. The shapes are bench/make_bench_model.py's (Llama-3.2-1B in bf16; Llama-3.1-8B quantized
to 4 bits, 4.52 GB as held), with rank-8 LoRA on every linear layer of the last 16 blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunetop.training.memory_plan import GB, ModelShape, Workload, plan_memory, step_need  # noqa: E402

LORA_1B = 16 * (2 * 32768 + 2 * 20480 + 3 * 81920)
ONE_B = ModelShape(layers=16, hidden=2048, intermediate=8192, heads=32, vocab=128256, parameters=1_235_814_400 + LORA_1B,
                   weight_bytes=1_235_814_400 * 2 + LORA_1B * 4, trainable_bytes=LORA_1B * 4)
LORA_8B = 10_485_760
EIGHT_B_Q4 = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, vocab=128256, parameters=8_030_261_248 + LORA_8B,
                        weight_bytes=4_520_000_000 + LORA_8B * 4, trainable_bytes=LORA_8B * 4)

# (label, shape, rows, width, packed, ce_chunk_tokens, recomputing blocks, the H200 figure)
MEASURED = [
    ("1B, 8 x 512 fixed", ONE_B, 8, 512, False, 0, 0, "~13 need; 13.05-13.71 at a 13 GB cap; 19.6 uncapped"),
    ("1B, 4 x 2048 packed", ONE_B, 4, 2048, True, 0, 0, "22.09 at a 15 GB cap (the cap cannot go below need)"),
    ("1B, 4 x 2048, CE 2048", ONE_B, 4, 2048, True, 2048, 0, "20.03 at a 15 GB cap"),
    ("1B, 4 x 2048, CE, 8 blocks", ONE_B, 4, 2048, True, 2048, 8, "15.49 at a 15 GB cap (fits)"),
    ("1B, 4 x 2048, CE, 6 blocks", ONE_B, 4, 2048, True, 2048, 6, "15.46 at a 15 GB cap (fits)"),
    ("1B, 8 x 2048 packed", ONE_B, 8, 2048, True, 0, 0, "49.6 uncapped (the starter-like config)"),
    ("1B, 8 x 2048, CE, all blocks", ONE_B, 8, 2048, True, 2048, 16, "15.52 at a 15 GB cap (fits)"),
    ("8B 4-bit, 2 x 2048, all blocks", EIGHT_B_Q4, 2, 2048, True, 0, 32, "15.5 (issue 22)"),
]


def main() -> None:
    print(f"{'step':<32} {'estimate GB':>11}  H200 (docs/PERFORMANCE.md, GB)")
    for label, shape, rows, width, packed, ce, blocks, measured in MEASURED:
        need = step_need(shape, Workload(rows=rows, width=width, packed=packed), ce, blocks).total / GB
        print(f"{label:<32} {need:>11.1f}  {measured}")
    print()
    print(f"{'budget GB':>9}  {'step':<20} plan")
    for budget in (15.5, 16, 20, 24, 40, 80):
        for label, shape, rows in (("1B, 4 x 2048", ONE_B, 4), ("1B, 8 x 2048", ONE_B, 8), ("8B 4-bit, 2 x 2048", EIGHT_B_Q4, 2)):
            plan = plan_memory(shape, Workload(rows=rows, width=2048, packed=True), budget * GB, cap_applies=True)
            print(f"{budget:>9g}  {label:<20} {plan.describe().split('; a step')[0]}; needs {plan.need.total / GB:.1f} GB")


if __name__ == "__main__":
    main()
