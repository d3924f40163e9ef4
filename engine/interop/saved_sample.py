"""``tunetop sample RUN --checkpoint ITERATION|best``: complete a prompt with a saved adapter.

The live ``sample`` asks a running engine for a completion from the weights in memory; this
loads the run's base model as its config names it, puts a checkpoint's adapter on it (as
``tunetop test`` does) and generates in this process, so it works on finished and dead runs.
The prompt is formatted as the run's training data formatted its prompts (the chat template for
chat data), as the live sample does, unless ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from tunetop.interop.evaluation import EvaluationError, put_adapter, saved_adapter
from tunetop.runs.folders import RunDir
from tunetop.training.config import RunConfig


@dataclass(frozen=True)
class SavedSample:
    """A completion, and where its weights came from and how its prompt went to the model."""

    completion: str
    iteration: int | None
    prompt_format: str


def sample_saved(
    run: RunDir, cfg: RunConfig, checkpoint: int, prompt: str, max_tokens: int, temperature: float, raw: bool = False
) -> SavedSample:
    """Complete ``prompt`` with the adapter of the checkpoint at iteration ``checkpoint``."""
    from tunetop.training.build import load_model_and_tokenizer
    from tunetop.training.datasource import load_run_splits
    from tunetop.training.sampling import sample

    weights_file, iteration = saved_adapter(run, checkpoint)
    model, tokenizer, _path = load_model_and_tokenizer(cfg)
    put_adapter(model, cfg, weights_file, run)
    splits = load_run_splits(cfg, tokenizer, required=())  # the prompt format the training data had
    data: Any = splits.get("train") or next(iter(splits.values()), None)
    if data is None and not raw:
        raise EvaluationError(f"run {run.id}'s data is gone, so its prompt format is unknown: pass --raw.")
    # sampling.sample takes what it needs of a trainer.
    holder = SimpleNamespace(
        model=model, tokenizer=tokenizer, prompt_format=getattr(data, "prompt_format", "text"),
        row_format=getattr(data, "row_format", None), parameters=SimpleNamespace(max_seq_length=cfg.data.max_seq_length),
    )
    completion = sample(holder, prompt, max_tokens, temperature, raw)
    return SavedSample(completion, iteration, "raw" if raw else holder.prompt_format)
