"""Score a run's saved adapter on a split of its data, apart from training (mlx_lm.lora's --test).

``tunetop test [RUN] [--split test|valid|train] [--checkpoint ITERATION] [--batches N] [--base]``
loads the run's base model and data as its config names them, puts the latest adapter (or a
numbered checkpoint's) on the model, and reports the mean per-token loss over the split and its
perplexity (``--base``: the model without the adapter, for comparison). It runs in its own
process, so it works on finished and dead runs alike; on a live run it scores the last saved
adapter, not the weights in memory (``tunetop evaluate`` asks the engine for a validation pass
on those).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunetop.runs.folders import RunDir
from tunetop.training.config import RunConfig


class EvaluationError(ValueError):
    """A score that cannot be computed (no adapter yet, no such split); the message says why."""


@dataclass(frozen=True)
class Score:
    """The mean per-token loss of one adapter over one split."""

    split: str
    loss: float
    examples: int
    adapter: str  # the weights file scored; "" for the base model
    iteration: int | None  # the save it came from, when known

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def describe(self) -> str:
        if not self.adapter:
            at = " (the base model, no adapter)"
        else:
            at = f" (adapter of iteration {self.iteration})" if self.iteration is not None else ""
        return f"{self.split} loss {self.loss:.4f}, perplexity {self.perplexity:.3f}, over {self.examples} examples{at}"


def score(
    run: RunDir,
    cfg: RunConfig,
    split: str = "test",
    checkpoint: int | None = None,
    batches: int = 0,
    base: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Score:
    """Load the run's model with its adapter (``base``: without one, for comparison) and return
    the mean per-token loss over ``split``.

    ``batches`` limits the pass to that many batches of ``training.batch_size`` (0 = the whole
    split), chosen as validation chooses them; ``progress`` hears (batches done, batches in all).
    """
    from tunetop.training.build import load_model_and_tokenizer
    from tunetop.training.trainer import evaluate

    weights_file, iteration = ("", None) if base else saved_adapter(run, checkpoint)
    model, tokenizer, _path = load_model_and_tokenizer(cfg)
    dataset = _split(cfg, tokenizer, split)
    if weights_file:
        put_adapter(model, cfg, weights_file, run)
    loss = evaluate(
        model, dataset, batch_size=cfg.training.batch_size, batch_count=batches, max_seq_length=cfg.data.max_seq_length,
        progress=progress,
    )
    examples = len(dataset) if batches == 0 else min(len(dataset), batches * cfg.training.batch_size)
    return Score(split, loss, examples, weights_file, iteration)


def saved_adapter(run: RunDir, checkpoint: int | None) -> tuple[str, int | None]:
    """The weights file of the latest adapter or a checkpoint's, and the iteration it was saved at."""
    from tunetop.interop.export import ExportError, adapter_source, saved_iteration

    try:
        weights_file, _adapter_config = adapter_source(run, checkpoint)
    except ExportError as error:
        raise EvaluationError(str(error)) from None
    return str(weights_file), saved_iteration(run, checkpoint)


def _split(cfg: RunConfig, tokenizer: Any, split: str) -> Any:
    from tunetop.training.datasource import describe, load_run_splits

    splits = load_run_splits(cfg, tokenizer, required=())
    if split not in splits:
        how = f"set {split}_split in data.hf_dataset" if cfg.data.hf_dataset else f"add {split}.jsonl"
        raise EvaluationError(
            f"{describe(cfg)}: has no {split} split ({split}.jsonl or {split}.txt, or data.hf_dataset's "
            f"{split}_split); it has {', '.join(sorted(splits)) or 'none'}. {how[0].upper() + how[1:]} or pass "
            "--split with one of those."
        )
    return splits[split]


def put_adapter(model: Any, cfg: RunConfig, weights_file: str, run: RunDir) -> None:
    """Set the model up as the run's config does (lora section) and load the adapter's weights."""
    import mlx.core as mx

    from tunetop.training.adapters import apply_fine_tuning, trainable_weights

    apply_fine_tuning(model, cfg.lora)
    weights = mx.load(weights_file)
    assert isinstance(weights, dict)
    slots = trainable_weights(model)
    if not weights or any(name not in slots or value.shape != slots[name].shape for name, value in weights.items()):
        raise EvaluationError(
            f"{weights_file}: its weights do not fit the model as {run.config} sets it up (lora section); "
            "was the config edited after training? Restore its lora settings or pass --checkpoint."
        )
    model.load_weights(list(weights.items()), strict=False)
