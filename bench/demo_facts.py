"""Does the demo teach what it shows? The share of the demo data's facts it answers by its end.

    python bench/demo_facts.py [--every 100] [--iterations N]
        trains `tunetop demo`'s config (tunetop.cli.demo_config) through the engine's own trainer
        (build_trainer and run_loop, in this process), then asks every single-fact question of
        the demo data (24 people x city, colour, pet: tunetop.training.embedded.fact_questions) through the
        sampling path of `tunetop sample` and the Playground (tunetop.training.sampling.sample, greedy),
        and prints the share answered exactly as the data says; --every N also asks along the way
        (the base model first), with the validation loss, trained tokens and training seconds
    python bench/demo_facts.py --run RUN
        asks a finished run's saved adapter (a `tunetop demo` run, say) the same questions

Training seconds leave out the asking, so runs on a busy machine compare by iterations and
tokens first. Results: README.md, "The demo".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx)


def ask(trainer: Any, max_tokens: int = 24) -> list[tuple[str, str, str]]:
    """(question, expected, answer) for every fact question, answered greedily as `tunetop sample` does."""
    from tunetop.training.embedded import fact_questions
    from tunetop.training.sampling import sample

    return [(question, expected.strip(), sample(trainer, question, max_tokens, 0.0).strip())
            for question, expected in fact_questions()]


def report(trainer: Any, seconds: float | None) -> int:
    """Print one line of figures (and the first wrong answers); return how many facts were right.

    ``seconds`` None: a saved adapter, whose training this process did not see."""
    answers = ask(trainer)
    right = sum(answer == expected for _q, expected, answer in answers)
    line = f"iteration {trainer.iteration}: {right}/{len(answers)} facts ({100 * right / len(answers):.0f}%)"
    if seconds is not None:
        validation = trainer.validate()
        loss = f", validation loss {validation.loss:.4f}" if validation is not None else ""
        line += f"{loss}, {trainer.trained_tokens:,} trained tokens, {seconds:.0f} s training"
    print(line, flush=True)
    wrong = [(q, a) for q, expected, a in answers if a != expected]
    for question, answer in wrong[:3]:
        print(f"    {question!r} -> {answer!r}")
    return right


def train_and_ask(every: int, iterations: int) -> int:
    from tunetop.cli import demo_config
    from tunetop.training.build import build_trainer
    from tunetop.training.trainer import Disposition, run_loop

    cfg = demo_config()
    if iterations:
        cfg.training.iterations = iterations
    cfg.training.steps_per_eval = 10**9  # validation only where this script reports
    cfg.checkpoints.save_every = 10**9
    with tempfile.TemporaryDirectory() as scratch:
        trainer, *_ = build_trainer(cfg, Path(scratch) / "adapters", checkpoint_path=Path(scratch) / "checkpoints")
        print(f"demo config: {cfg.training.iterations} iterations, batch {cfg.training.batch_size}, "
              f"learning rate {cfg.optimizer.learning_rate:g} ({cfg.schedule.name}), LoRA rank {cfg.lora.rank}, "
              f"scale {cfg.lora.scale:g}, num_layers {cfg.lora.num_layers}", flush=True)
        clock = {"training": 0.0, "since": time.monotonic()}
        if every:
            report(trainer, 0.0)
            clock["since"] = time.monotonic()

        def between_steps(t: Any) -> Disposition:
            if every and t.iteration and t.iteration % every == 0 and t.iteration < cfg.training.iterations:
                clock["training"] += time.monotonic() - clock["since"]
                report(t, clock["training"])
                clock["since"] = time.monotonic()
            return Disposition.MORE

        run_loop(trainer, lambda _event: Disposition.MORE, between_steps)
        clock["training"] += time.monotonic() - clock["since"]
        return report(trainer, clock["training"])


def ask_run(spec: str) -> int:
    import mlx.core as mx

    from tunetop.interop.export import adapter_source
    from tunetop.runs.folders import resolve
    from tunetop.training import config as config_module
    from tunetop.training.build import build_trainer

    run = resolve(spec)
    cfg = config_module.load(run.config)
    weights_file, _ = adapter_source(run, None)
    with tempfile.TemporaryDirectory() as scratch:
        trainer, *_ = build_trainer(cfg, Path(scratch))  # the run's model, tokenizer and prompt format
        weights = mx.load(str(weights_file))
        assert isinstance(weights, dict)
        trainer.model.load_weights(list(weights.items()), strict=False)
        trainer.iteration = int(run.status().get("iteration") or 0)
        return report(trainer, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="ask a finished run's saved adapter instead of training")
    parser.add_argument("--every", type=int, default=0, help="also ask every N iterations (and the base model first)")
    parser.add_argument("--iterations", type=int, default=0, help="instead of the demo's")
    args = parser.parse_args()
    right = ask_run(args.run) if args.run else train_and_ask(args.every, args.iterations)
    print(f"RESULT facts_right={right}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
