"""Where a run's data comes from, as its config names it: a folder of split files, the embedded
default, or Hugging Face datasets (tunetop.training.hf_data), read with the row format of the ``[data]`` table (feature names, chat template, prompt mask).

A run's build (tunetop.training.build) and ``tunetop test`` (tunetop.interop.evaluation) both load through here, so
they tokenize a run's data the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunetop.training.config import EMBEDDED, DataConfig, RunConfig
from tunetop.training.data import Dataset, RowFormat, load_splits, resolve_chat_template


def row_format(data: DataConfig, tokenizer: Any, source: str = "") -> RowFormat:
    """The ``[data]`` table's row format; a chat template file is read here."""
    where = f"{source or 'config'}: data.chat_template"
    return RowFormat(
        text_feature=data.text_feature,
        prompt_feature=data.prompt_feature,
        completion_feature=data.completion_feature,
        chat_feature=data.chat_feature,
        mask_prompt=data.mask_prompt,
        chat_template=resolve_chat_template(data.chat_template, tokenizer, where),
    )


def data_folder(cfg: RunConfig) -> Path:
    """The folder holding the run's split files."""
    from tunetop.training.embedded import embedded_data_path

    return embedded_data_path() if cfg.data.path == EMBEDDED else Path(cfg.data.path)


def describe(cfg: RunConfig) -> str:
    """Where the run's data comes from, for messages."""
    if cfg.data.hf_dataset:
        return " + ".join(str(entry["path"]) for entry in cfg.data.hf_dataset)
    return str(data_folder(cfg))


def load_run_splits(cfg: RunConfig, tokenizer: Any, required: tuple[str, ...] = ("train", "valid")) -> dict[str, Dataset]:
    """Every split of the run's data that exists; the ``required`` ones must."""
    fmt = row_format(cfg.data, tokenizer, cfg.source)
    if cfg.data.hf_dataset:
        from tunetop.training.hf_data import load_hf_splits

        return load_hf_splits(cfg.data.hf_dataset, tokenizer, fmt, required, cfg.source)
    from tunetop.training.token_cache import load_split_cached

    return load_splits(data_folder(cfg), tokenizer, required=required, row_format=fmt, loader=load_split_cached)
