"""How soon a run shows something: from the command to the first validation and the first training report.

    python bench/first_step.py [--rounds 5] [--which both|tunetop|mlx_lm] [--cold] [--packing auto|off]
                               [--model DIR --data DIR]

``tunetop train CONFIG`` (the starter config: the embedded model and data, batch 8, a report every
10 steps) against ``python -m mlx_lm.lora`` with the same model, data, batch, report interval,
validation batches and LoRA layers, each in its own process, the rounds alternating which goes
first. The times are read from their output as it comes (unbuffered): the first line saying a
validation loss, and the first saying a training loss; then the process is ended (SIGTERM). Both
validate before their first step. mlx-lm gets the same OpenBLAS as tunetop (LD_PRELOAD), so the
steps cost the same. ``--cold`` adds a third contestant, tunetop with its token cache emptied first
(a first run on new data); otherwise only tunetop's first round can be cold. Packed (the default), a tunetop step
trains about 38 examples where mlx-lm's trains 8; ``--packing off`` gives both the same batches. The machine's load average is printed
with the medians, because on a shared machine it moves every figure. ``--model``/``--data`` time
another model and plain-text data instead (bench/make_bench_model.py's, on the H200): then both
train on whole rows (no prompt masking), LoRA on the last 16 blocks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tunetop import blas as _blas  # noqa: E402,F401  (the package loads OpenBLAS before mlx)

# tunetop: "Iter 0: val loss 11.055, ..." and "Iter 10: train loss 6.944, ..."; mlx-lm 0.32's table:
# "      1    val 11.040    3.51s" and "     10    6.928 ▼      170      1.3k" (after its colour codes).
VALIDATION = re.compile(r"\bval loss\b|^\s*\d+\s+val\s+\d", re.IGNORECASE)
TRAIN = re.compile(r"\btrain loss\b|^\s*\d+\s+\d+\.\d+\s", re.IGNORECASE)
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def timed(command: list[str], env: dict[str, str], log: Path, limit: float) -> tuple[float, float]:
    """Seconds from start to the first validation line and to the first training line."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   cwd=ROOT, start_new_session=True)
        assert process.stdout is not None
        try:
            for raw in process.stdout:
                now = time.perf_counter() - start
                line = COLOUR.sub("", raw)
                out.write(f"{now:8.3f} {line}")
                if "validation" not in first and VALIDATION.search(line):
                    first["validation"] = now
                if "train" not in first and TRAIN.search(line):
                    first["train"] = now
                if len(first) == 2 or now > limit:
                    break
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # its own session: the engine and anything it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if len(first) < 2:
        raise SystemExit(f"{command[:4]} printed no {'validation' if 'validation' not in first else 'training'} "
                         f"line in {limit:.0f}s; its output: {log}")
    return first["validation"], first["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--which", choices=["both", "tunetop", "mlx_lm"], default="both")
    parser.add_argument("--cold", action="store_true", help="also time tunetop with its token cache emptied first")
    parser.add_argument("--limit", type=float, default=600, help="seconds a run may take to print both lines")
    parser.add_argument("--packing", choices=["auto", "off"], default="auto",
                        help="tunetop's data.packing: off trains mlx-lm's batches of 8 padded examples")
    parser.add_argument("--model", default="", help="a model folder instead of the embedded model")
    parser.add_argument("--data", default="", help="a folder of plain-text train/valid.jsonl (with --model)")
    args = parser.parse_args()

    from tunetop.blas import loaded_blas
    from tunetop.training.config import starter_text
    from tunetop.training.embedded import build_embedded, embedded_data_path, embedded_model_path

    build_embedded()  # built once (cached); neither timing includes it
    scratch = Path(tempfile.mkdtemp(prefix="tt-first-step-"))
    cache = Path(os.environ.get("TUNETOP_CACHE") or Path.home() / ".cache" / "tunetop")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNETOP_HOME=str(scratch / "home"), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    config = scratch / "run.toml"
    text = (starter_text().replace("steps_per_eval = 50", "steps_per_eval = 100")
            .replace('packing = "auto"', f'packing = "{args.packing}"'))
    model, data, layers, mask = str(embedded_model_path()), str(embedded_data_path()), "4", ["--mask-prompt"]
    if args.model:
        model, data, layers, mask = args.model, args.data, "16", []
        text = (text.replace('path = "@embedded"', f'path = "{model}"', 1).replace('path = "@embedded"', f'path = "{data}"', 1)
                .replace("mask_prompt = true", "mask_prompt = false"))
    config.write_text(text)
    tunetop = [sys.executable, "-m", "tunetop.cli", "train", str(config)]
    mlx_lm = [
        sys.executable, "-m", "mlx_lm.lora", "--model", model, "--train",
        "--data", data, "--batch-size", "8", "--iters", "300", "--num-layers", layers,
        "--steps-per-report", "10", "--steps-per-eval", "100", "--val-batches", "10", "--save-every", "1000",
        "--adapter-path", str(scratch / "mlx_lm"), "--learning-rate", "5e-4", *mask,
    ]
    mlx_env = dict(env, LD_PRELOAD=loaded_blas() or "")
    which = ["tunetop", "mlx_lm"] if args.which == "both" else [args.which]
    if args.cold and "tunetop" in which:
        which.insert(1, "tunetop cold")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in which}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for name in which[round_ % len(which):] + which[: round_ % len(which)]:  # each goes first in turn
            if name == "tunetop cold":
                shutil.rmtree(cache / "tokens", ignore_errors=True)
            command, run_env = (mlx_lm, mlx_env) if name == "mlx_lm" else (tunetop, env)
            validation, train = timed(command, run_env, scratch / f"{name.replace(' ', '-')}-{round_}.log", args.limit)
            times[name].append((validation, train))
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {name:<12} first validation {validation:6.2f}s   first training report {train:6.2f}s",
                  flush=True)
    print(f"median of {args.rounds} rounds; load average (1 min) {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} CPUs; logs in {scratch}")
    print(f"{'':<12} {'first validation s':>19} {'first report s':>15}")
    for name, pairs in times.items():
        print(f"{name:<12} {statistics.median(v for v, _ in pairs):>19.2f} {statistics.median(t for _, t in pairs):>15.2f}")


if __name__ == "__main__":
    main()
