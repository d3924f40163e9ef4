"""Where a training step's peak memory goes: tunetop's step against mlx-lm's, on one model.

    python bench/memory_probe.py --model DIR --data DIR [--batch-size 8] [--steps 6]

Builds tunetop's trainer (as bench/throughput.py does, with mlx-lm's float32 LoRA products so
the graphs match), then times and measures, on the same model and batches:
  tunetop   Trainer.step (the loop's bookkeeping included)
  bare      tunetop's compiled step alone
  mlx_lm    mlx-lm 0.32's compiled step and default_loss, as its trainer builds them
Peak = the highest active memory over the steps after the first two (compiling left out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model-precision", action="store_true", help="tunetop's bf16 LoRA products")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss as mlx_lm_loss

    from tunetop.training import config as config_module
    from tunetop.training.build import build_trainer

    mx.set_memory_limit(100 * 10**9)
    cfg = config_module.RunConfig()
    cfg.model.path, cfg.data.path = args.model, args.data
    cfg.data.packing = "off"
    cfg.lora.num_layers, cfg.lora.rank, cfg.lora.scale = 16, 8, 20.0
    cfg.lora.model_precision = args.model_precision
    cfg.training.batch_size = args.batch_size
    trainer, *_ = build_trainer(cfg, Path(tempfile.mkdtemp()) / "adapters")
    batches = [trainer.next_batch() for _ in range(args.steps)]
    print(f"held after building: {mx.get_active_memory() / 1e9:.2f} GB; batch {batches[0].tokens.shape}")

    def measure(name: str, run_step) -> None:  # type: ignore[no-untyped-def]
        for clear in (False, True):  # mlx-lm's trainer empties MLX's buffer cache after every step
            mx.clear_cache()
            peak = 0.0
            for k, batch in enumerate(batches):
                if k == 2:
                    mx.reset_peak_memory()
                run_step(batch)
                if clear:
                    mx.clear_cache()
                if k >= 2:
                    peak = max(peak, mx.get_peak_memory() / 1e9)
            label = name + (" + clear_cache" if clear else "")
            print(f"{label:<22} steady peak {peak:6.2f} GB, held {mx.get_active_memory() / 1e9:5.2f} GB")

    def tunetop_step(batch) -> None:  # type: ignore[no-untyped-def]
        trainer._batches = iter([(0, 0, batch)])
        trainer.step()

    measure("tunetop", tunetop_step)

    def bare_step(batch) -> None:  # type: ignore[no-untyped-def]
        value, count, _ = trainer._step(None, True, *batch.arrays())
        mx.eval(trainer._state, value, count)

    measure("bare", bare_step)

    model, optimizer = trainer.model, trainer.optimizer
    loss_value_and_grad = nn.value_and_grad(model, mlx_lm_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):  # type: ignore[no-untyped-def]  (mlx-lm 0.32's, verbatim)
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return lvalue, toks, None

    def mlx_lm_step(batch) -> None:  # type: ignore[no-untyped-def]
        lvalue, toks, _ = step(batch.arrays(), None, True)
        mx.eval(state, lvalue, toks)

    measure("mlx_lm", mlx_lm_step)


if __name__ == "__main__":
    main()
