"""Training throughput of tunetop's engine against mlx_lm.lora on the same model, data and batch.

    python bench/throughput.py --mask-prompt            # embedded model and data, both trainers
    python bench/throughput.py --model DIR --data DIR --batch-size 8 --iters 300 --num-layers 16
    TUNETOP_BLAS=none python bench/throughput.py        # with the mlx wheel's reference BLAS

Each trainer runs in its own process (clean peak-memory figures). Steady tokens/s leaves out the
first report interval, which includes compiling the step. Tokens are real target tokens: mlx-lm
counts one padding target per row as well, which is subtracted from its count here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: loads OpenBLAS before mlx, unless TUNETOP_BLAS=none)


def _steady(reports: list[dict[str, float]]) -> dict[str, float]:
    """Sum tokens and seconds over every report interval but the first."""
    if not reports:
        raise SystemExit("no training reports: the run stopped early (a non-finite loss?)")
    rest = reports[1:] or reports
    seconds = sum(r["seconds"] for r in rest)
    tokens = sum(r["tokens"] for r in rest)
    steps = sum(r["steps"] for r in rest)
    first = reports[0]
    return {
        "tokens_per_second": tokens / seconds,
        "iterations_per_second": steps / seconds,
        "first_interval_seconds": first["seconds"],
        "first_interval_tokens_per_second": first["tokens"] / first["seconds"],
    }


class MemoryWatch:
    """Peak memory after the first report interval (compiling and first steps left out), and the
    memory still held between steps (weights, optimizer state, cached graphs' inputs)."""

    def __init__(self) -> None:
        self.reports = 0
        self.first_peak = 0.0
        self.steady_peak = 0.0
        self.held = 0.0

    def at_report(self) -> None:
        import mlx.core as mx

        self.reports += 1
        if self.reports == 1:
            self.first_peak = mx.get_peak_memory() / 1e9
            mx.reset_peak_memory()
        else:
            self.steady_peak = max(self.steady_peak, mx.get_peak_memory() / 1e9)
        self.held = mx.get_active_memory() / 1e9

    def result(self) -> dict[str, float]:
        import mlx.core as mx

        overall = max(self.first_peak, mx.get_peak_memory() / 1e9)
        return {"peak_memory_gb": overall, "steady_peak_gb": self.steady_peak, "held_gb": self.held}


def run_ours(args: argparse.Namespace) -> dict[str, Any]:

    from tunetop.training import config as config_module
    from tunetop.training.build import build_trainer
    from tunetop.training.trainer import Train, run_loop

    cfg = config_module.RunConfig()
    cfg.model.path, cfg.data.path = args.model, args.data
    cfg.data.mask_prompt = args.mask_prompt
    cfg.data.max_seq_length = args.max_seq_length
    cfg.data.packing, cfg.data.pack_length = args.packing, args.pack_length
    cfg.training.ce_chunk_tokens = args.ce_chunk_tokens
    cfg.lora.model_precision = args.lora_precision == "model"
    cfg.training.clear_cache_gb = args.clear_cache_gb
    cfg.training.grad_checkpoint = args.grad_checkpoint or args.grad_checkpoint_blocks >= 0
    cfg.training.grad_checkpoint_blocks = args.grad_checkpoint_blocks
    cfg.training.memory_limit_gb = args.memory_limit_gb
    cfg.training.memory_budget_gb = args.memory_budget_gb
    cfg.lora.num_layers, cfg.lora.rank, cfg.lora.scale = args.num_layers, args.rank, 20.0
    t = cfg.training
    t.batch_size, t.iterations, t.steps_per_report, t.steps_per_eval = args.batch_size, args.iters, args.report, 10**9
    cfg.optimizer.learning_rate = 5e-4
    cfg.checkpoints.save_every = 10**9
    trainer, _path, _trainable, total = build_trainer(cfg, Path(args.scratch) / "ours", report=print)
    trainer.valid_plan = None  # throughput only
    reports: list[dict[str, float]] = []
    watch = MemoryWatch()

    def progress(event: Any) -> None:
        if isinstance(event, Train):
            watch.at_report()
            seconds = args.report / event.iterations_per_second
            reports.append({"seconds": seconds, "tokens": event.tokens_per_second * seconds, "steps": args.report})

    start = time.perf_counter()
    run_loop(trainer, progress)
    wall = time.perf_counter() - start
    return {
        "trainer": "tunetop",
        "wall_seconds": wall,
        "steps_per_epoch": len(trainer.train_plan),
        "parameters": total,
        "packed": trainer.parameters.pack_width,
        **watch.result(),
        **_steady(reports),
    }


def run_mlx_lm(args: argparse.Namespace) -> dict[str, Any]:
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    from tunetop.training.config import EMBEDDED
    from tunetop.training.embedded import embedded_data_path, embedded_model_path

    reports: list[dict[str, float]] = []
    state = {"tokens": 0.0}
    watch = MemoryWatch()

    class Capture(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            watch.at_report()
            trained = float(info["trained_tokens"])
            counted = trained - state["tokens"]
            state["tokens"] = trained
            seconds = args.report / info["iterations_per_second"]
            real = counted - args.batch_size * args.report  # mlx-lm counts one padding target per row
            reports.append({"seconds": seconds, "tokens": real, "steps": args.report})

    lora.get_reporting_callbacks = lambda *a, **k: Capture()  # type: ignore[assignment]
    model = str(embedded_model_path()) if args.model == EMBEDDED else args.model
    data = str(embedded_data_path()) if args.data == EMBEDDED else args.data
    namespace = lora.build_parser().parse_args(
        [
            "--model", model, "--train", "--data", data,
            "--batch-size", str(args.batch_size), "--iters", str(args.iters),
            "--num-layers", str(args.num_layers), "--steps-per-report", str(args.report),
            "--steps-per-eval", str(10**9), "--save-every", str(10**9), "--val-batches", "1",
            "--adapter-path", str(Path(args.scratch) / "mlx_lm"), "--learning-rate", "5e-4",
            "--max-seq-length", str(args.max_seq_length),
        ]
        + (["--mask-prompt"] if args.mask_prompt else [])
        + (["--grad-checkpoint"] if args.mlx_lm_grad_checkpoint else [])
    )
    values = vars(namespace)
    for key, value in lora.CONFIG_DEFAULTS.items():
        if values.get(key) is None:
            values[key] = value
    values["lora_parameters"] = {"rank": args.rank, "scale": 20.0, "dropout": 0.0}
    start = time.perf_counter()
    lora.run(namespace)
    wall = time.perf_counter() - start
    with open(Path(data) / "train.jsonl") as lines:
        examples = sum(1 for line in lines if line.strip())
    return {
        "trainer": "mlx_lm.lora",
        "wall_seconds": wall,
        "steps_per_epoch": examples // args.batch_size,  # mlx-lm's batches leave the remainder out
        **watch.result(),
        **_steady(reports),
    }


def epoch_seconds(result: dict[str, Any]) -> float:
    """Time for one pass over the training set at the steady rate (each trainer's own batches)."""
    return float(result["steps_per_epoch"] / result["iterations_per_second"])


def measure_peak(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul TFLOP/s on the default device: the denominator of MFU."""
    import mlx.core as mx

    a = mx.random.normal((size, size)).astype(mx.bfloat16)
    b = mx.random.normal((size, size)).astype(mx.bfloat16)
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
        mx.eval(c)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="@embedded")
    parser.add_argument("--data", default="@embedded")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--report", type=int, default=20)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--mask-prompt", action="store_true", help="train on completions only (prompt/completion data)")
    parser.add_argument("--memory-limit-gb", type=float, default=0,
                        help="mx.set_memory_limit, a soft cap (tunetop: training.memory_limit_gb), e.g. on a shared GPU")
    parser.add_argument("--memory-budget-gb", type=lambda v: v if v == "auto" else float(v), default=0.0,
                        help="tunetop's training.memory_budget_gb; 0 (here the default) = the settings as given")
    parser.add_argument("--which", choices=["both", "ours", "mlx_lm"], default="both")
    parser.add_argument("--scratch", default="/tmp/tunetop-bench")
    parser.add_argument("--packing", choices=["auto", "on", "off"], default="auto", help="tunetop's data.packing")
    parser.add_argument("--pack-length", type=int, default=0, help="tunetop's data.pack_length (0 = automatic)")
    parser.add_argument("--ce-chunk-tokens", type=int, default=0, help="tunetop's training.ce_chunk_tokens")
    parser.add_argument("--grad-checkpoint", action="store_true", help="tunetop's training.grad_checkpoint")
    parser.add_argument("--mlx-lm-grad-checkpoint", action="store_true", help="mlx_lm.lora's --grad-checkpoint")
    parser.add_argument("--grad-checkpoint-blocks", type=int, default=-1,
                        help="tunetop's training.grad_checkpoint_blocks (>= 0 turns grad_checkpoint on)")
    parser.add_argument("--clear-cache-gb", type=float, default=-1.0, help="tunetop's training.clear_cache_gb")
    parser.add_argument("--lora-precision", choices=["model", "float32"], default="model",
                        help="tunetop's lora.model_precision: LoRA products in the model's dtype, or float32 as mlx-lm")
    parser.add_argument("--peak-tflops", type=float, default=0, help="bf16 matmul rate for MFU (see --measure-peak)")
    parser.add_argument("--measure-peak", action="store_true", help="time a bf16 8192^3 matmul and print TFLOP/s")
    args = parser.parse_args()
    if args.measure_peak:
        print(f"PEAK {measure_peak():.1f} TFLOP/s (bf16 matmul, 8192x8192x8192)")
        return
    if args.memory_limit_gb and args.which != "ours":  # tunetop sets it from its config
        import mlx.core as mx

        mx.set_memory_limit(int(args.memory_limit_gb * 1e9))
    if args.which == "ours":
        print("RESULT " + json.dumps(run_ours(args)))
        return
    if args.which == "mlx_lm":
        print("RESULT " + json.dumps(run_mlx_lm(args)))
        return
    rows = []
    for which in ("ours", "mlx_lm"):
        argv = [sys.executable, __file__, "--which", which] + [
            a for a in sys.argv[1:] if not a.startswith("--which")
        ]
        out = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{which} failed")
        rows.append(json.loads(lines[-1][7:]))
    packed = rows[0].get("packed", 0)
    how = f"packed rows of {packed} tokens" if packed else "padded batches"
    print(f"batch {args.batch_size}, {args.iters} iterations, model {args.model}; tunetop: {how}")
    mfu_head = f" {'MFU':>6}" if args.peak_tflops else ""
    print(f"{'trainer':<12} {'steady tok/s':>12} {'it/s':>7} {'epoch s':>8} {'1st interval tok/s':>19} {'peak GB':>8} {'steady':>7} {'held':>6} {'wall s':>7}{mfu_head}")
    for r in rows:
        # About 4 x parameters FLOPs per trained token for LoRA (forward 2P, backward to the inputs 2P).
        mfu = f" {r['tokens_per_second'] * 4 * rows[0]['parameters'] / (args.peak_tflops * 1e12):>6.1%}" if args.peak_tflops else ""
        print(
            f"{r['trainer']:<12} {r['tokens_per_second']:>12.0f} {r['iterations_per_second']:>7.2f} {epoch_seconds(r):>8.1f} "
            f"{r['first_interval_tokens_per_second']:>19.0f} {r['peak_memory_gb']:>8.3f} {r['steady_peak_gb']:>7.2f} {r['held_gb']:>6.2f} {r['wall_seconds']:>7.1f}{mfu}"
        )
    print(f"ratio tunetop / mlx_lm.lora (steady tokens/s): {rows[0]['tokens_per_second'] / rows[1]['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
