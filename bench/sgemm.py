"""sgemm GFLOP/s of MLX on the CPU, with the BLAS tunetop loads and with the wheel's own.

    python bench/sgemm.py            # both, each in a fresh process
    python bench/sgemm.py --child    # one measurement in this process (TUNETOP_BLAS decides)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: loads OpenBLAS before mlx, unless TUNETOP_BLAS=none)


def measure(n: int, repeats: int) -> dict:
    import mlx.core as mx

    from tunetop.blas import loaded_blas

    mx.set_default_device(mx.cpu)
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = time.perf_counter() - start
    return {"blas": loaded_blas() or "mlx wheel (reference BLAS)", "n": n, "gflops": 2 * n**3 * repeats / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("-n", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.repeats)))
        return
    rows = []
    for setting in ("", "none"):
        env = dict(os.environ, TUNETOP_BLAS=setting)
        out = subprocess.run(
            [sys.executable, __file__, "--child", "-n", str(args.n), "--repeats", str(args.repeats)],
            env=env, capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'BLAS':<60} {'n':>6} {'GFLOP/s':>9}")
    for row in rows:
        print(f"{row['blas']:<60} {row['n']:>6} {row['gflops']:>9.1f}")


if __name__ == "__main__":
    main()
