"""A run's trainer from its config: the model (local, the Hub, or the embedded default), its
tokenizer and data, LoRA applied, the packing width and memory plan chosen, the optimizer.

``build_trainer`` is what an engine (rank 0) and every follower rank do before training, and
``load_model_and_tokenizer`` what ``tunetop test`` does before scoring; both raise errors a user
can act on (ModelError, ConfigError, DataError), never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunetop.training import config as config_module
from tunetop.training.config import EMBEDDED, ConfigError, RunConfig


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message names it and says what to check."""


def load_model_and_tokenizer(cfg: RunConfig, report: Callable[[str], None] | None = None) -> tuple[Any, Any, str]:
    """mlx-lm's loader on a local folder or a Hugging Face id (downloaded first, with progress).

    The embedded default is built first. ``report`` receives download and build progress lines.
    """
    from mlx_lm import load

    from tunetop.training import hub
    from tunetop.training.embedded import embedded_model_path

    path = str(embedded_model_path(report)) if cfg.model.path == EMBEDDED else cfg.model.path
    where = f"model.path in {cfg.source or 'the config'}"
    try:
        if not hub.is_local(path) and "/" in path and not path.startswith((".", "/", "~")):
            path = str(hub.fetch(path, cfg.model.revision or None, report or (lambda _line: None)))
        model, tokenizer = load(  # type: ignore[misc]
            path, revision=cfg.model.revision or None, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as error:  # mlx-lm / huggingface_hub raise many types; all mean "cannot load"
        raise ModelError(hub.explain(cfg.model.path, where, error)) from None
    return model, tokenizer, path


def build_trainer(
    cfg: RunConfig,
    adapter_path: Path,
    checkpoint_path: Path | None = None,
    config_hash: str = "",
    shard: Any = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Any, str, int, int]:
    """Model, adapters, data, optimizer from a config: (trainer, model path, trainable, total).

    ``report`` receives progress lines while a model downloads.
    """
    from tunetop.training.adapters import adapter_config, apply_fine_tuning, count_parameters
    from tunetop.training.datasource import load_run_splits
    from tunetop.training.optimizers import build_optimizer, build_schedule
    from tunetop.training.trainer import Trainer, TrainingParameters, default_loss, seed_everything

    config_module.check_paths(cfg)
    if shard is not None:
        config_module.check_ranks(cfg, shard.size)
    loss = default_loss
    if cfg.training.loss:  # checked before the model loads: a typo fails in a second
        from tunetop.training.custom_loss import load_loss

        loss = load_loss(cfg.training.loss, cfg.source)
    model, tokenizer, model_path = load_model_and_tokenizer(cfg, report)
    splits = load_run_splits(cfg, tokenizer)
    # The LoRA weights are drawn from the global streams: seed them here, not before loading,
    # because loading may have drawn (a first run builds the embedded model in this process).
    seed_everything(cfg.training.seed)
    try:
        apply_fine_tuning(model, cfg.lora)
    except ConfigError as error:
        raise ConfigError(f"{cfg.source or 'config'}: {error}") from None
    trainable, total = count_parameters(model)
    t = cfg.training
    pack_width = choose_pack_width(cfg, splits["train"], model, report, loss)
    from tunetop.training.memory_budget import plan_run

    memory = plan_run(cfg, model, splits["train"], pack_width, shard.size if shard is not None else 1, report)
    parameters = TrainingParameters.from_config(
        cfg,
        adapter_path=adapter_path,
        # The memory plan may turn these on or pick them from the device's memory (training.memory_budget_gb).
        grad_checkpoint=memory.grad_checkpoint,
        grad_checkpoint_blocks=memory.grad_checkpoint_blocks,
        ce_chunk_tokens=memory.ce_chunk_tokens,
        micro_batches=memory.micro_batches,
        memory_limit_gb=memory.memory_limit_gb,
        adapter_config=adapter_config(cfg.lora, model_path),
        checkpoint_path=checkpoint_path,
        config_hash=config_hash,
        pack_width=pack_width,
    )
    optimizer = build_optimizer(cfg.optimizer, cfg.source)
    schedule = build_schedule(cfg.optimizer, cfg.schedule, t.iterations)
    trainer = Trainer(
        model, optimizer, splits["train"], splits.get("valid"), parameters, schedule, loss=loss, shard=shard
    )
    trainer.tokenizer = tokenizer  # for samples from the live adapter (prompts formatted as the training data's)
    if pack_width and report is not None:
        report(trainer.train_plan.describe())  # type: ignore[union-attr]
    return trainer, model_path, trainable, total


def choose_pack_width(
    cfg: RunConfig, train_set: Any, model: Any, report: Callable[[str], None] | None, loss: Any = None
) -> int:
    """The packed row width for this run, or 0 for padded batches (``data.packing``)."""
    import mlx.nn as nn

    from tunetop.training.custom_loss import accepts_segments
    from tunetop.training.packing import helps, pack_width

    mode = cfg.data.packing
    if mode == "off":
        return 0
    if cfg.training.loss and loss is not None and not accepts_segments(loss):
        if mode == "on":
            raise ConfigError(f"{cfg.source or 'config'}: data.packing = \"on\" needs training.loss = {cfg.training.loss!r} "
                              "to take the example boundaries: add a segments=None parameter (README, 'As a library'), "
                              "or set data.packing = \"off\".")
        if report is not None:
            report(f"packing off: training.loss = {cfg.training.loss!r} takes no segments parameter (data.packing = \"auto\")")
        return 0
    width = min(cfg.data.pack_length or pack_width(train_set, cfg.data.max_seq_length), cfg.data.max_seq_length)
    has_rope = any(isinstance(getattr(m, "rope", None), nn.Module) for _n, m in model.named_modules())
    if not has_rope:
        if mode == "on":
            raise ConfigError(f"{cfg.source or 'config'}: data.packing = \"on\" needs a model with rotary position "
                              "embeddings (positions restart per packed example); this one has none. Set it to \"auto\" or \"off\".")
        return 0
    if mode == "auto" and not helps(train_set, width):
        if report is not None:
            report(f"packing off: examples fill rows of {width} tokens on their own (data.packing = \"auto\")")
        return 0
    return width
