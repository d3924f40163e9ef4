"""The memory goal's verdict from one ``bench/h200.sh OUT memory`` run.

    python3 bench/memory_table.py MLX_FIXED MLX_VARIABLE OURS [MORE_OURS ...]

Each file holds the output of one ``bench/throughput.py --which ...`` process, whose last
``RESULT`` line is its JSON summary. The goal (throughput issue): on variable-length data at
least 3x mlx_lm.lora's steady tokens/s, with a peak no higher than mlx_lm.lora's on fixed-length
data of the same batch. OURS is judged; further files are listed for comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def last_result(path: Path) -> dict[str, Any]:
    """The JSON of the last RESULT line in ``path``."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{path}: no RESULT line (the run failed; its output is in that file)")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    paths = [Path(a) for a in argv]
    fixed, variable, ours, *more = (last_result(p) for p in paths)
    print(f"{'run':<28} {'steady tok/s':>12} {'epoch s':>8} {'peak GB':>8} {'x mlx-lm variable':>18}")
    for path, r in zip(paths, (fixed, variable, ours, *more), strict=True):
        ratio = r["tokens_per_second"] / variable["tokens_per_second"]
        epoch = f"{r['steps_per_epoch'] / r['iterations_per_second']:>8.1f}" if "steps_per_epoch" in r else f"{'-':>8}"
        print(f"{path.stem:<28} {r['tokens_per_second']:>12.0f} {epoch} {r['peak_memory_gb']:>8.2f} {ratio:>18.2f}")
    speed = ours["tokens_per_second"] / variable["tokens_per_second"]
    fits = ours["peak_memory_gb"] <= fixed["peak_memory_gb"]
    print(
        f"goal: {speed:.2f}x mlx-lm's variable-length speed (>= 3: {'met' if speed >= 3 else 'NOT met'}); "
        f"peak {ours['peak_memory_gb']:.2f} GB vs mlx-lm's fixed-length {fixed['peak_memory_gb']:.2f} GB "
        f"({'met' if fits else 'NOT met'})"
    )
    return 0 if speed >= 3 and fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
