"""Hugging Face datasets as a run's data (``data.hf_dataset``), through the optional ``datasets``
library (``pip install 'tunetop[hf]'``).

Each entry is mlx_lm.lora's ``hf_dataset`` entry: ``path`` (a Hub id, a local folder of data
files such as parquet or JSON lines, or a folder written by ``save_to_disk``), ``config`` (keyword
arguments for ``datasets.load_dataset``: ``name``, ``data_dir``, ``revision``...), the split of each
of ours (``train_split`` = "train[:80%]", ``valid_split`` = "train[-10%:]" as in mlx-lm;
``test_split`` none unless given; slices as ``datasets`` writes them), and the feature names (those
of ``[data]`` unless given). Rows are tokenized by engine.data as file rows are; several entries
are concatenated split by split. A dataset that cannot be loaded is one paragraph saying which and
what to do, as a model that cannot be loaded is (engine.hub).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .data import DataError, Dataset, RowFormat, rows_to_dataset

SPLIT_DEFAULTS = {"train": "train[:80%]", "valid": "train[-10%:]", "test": ""}
"""Our split -> the slice of the dataset it is, when the entry does not say (mlx-lm's defaults)."""

FEATURES = ("text_feature", "prompt_feature", "completion_feature", "chat_feature")


class MissingSplit(DataError):
    """The dataset has no split for the slice asked for."""


def _datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{where}: Hugging Face datasets need the 'datasets' library: pip install 'tunetop[hf]' "
            "(or pip install datasets)."
        ) from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars while loading: the engine's output is its events."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _saved_on_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_disk(datasets: Any, path: Path, spec: str) -> Any:
    """A slice of a ``save_to_disk`` folder (a single saved Dataset is its "train" split)."""
    saved = datasets.load_from_disk(str(path))
    parts = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    instruction = datasets.ReadInstruction.from_spec(spec)
    lengths = {name: len(part) for name, part in parts.items()}
    try:
        pieces = instruction.to_absolute(lengths)
    except (ValueError, KeyError):
        raise ValueError(f"Unknown split in {spec!r}. Should be one of {sorted(parts)}.") from None
    selected = [parts[p.splitname].select(range(p.from_, p.to)) for p in pieces]
    return selected[0] if len(selected) == 1 else datasets.concatenate_datasets(selected)


def load_rows(entry: dict[str, Any], spec: str, where: str) -> Any:
    """The rows of one split ``spec`` ("train[:80%]") of one entry, as a ``datasets.Dataset``."""
    datasets = _datasets(where)
    path = str(entry["path"])
    try:
        with _quiet(datasets):
            local = Path(path).expanduser()
            if local.is_dir() and _saved_on_disk(local):
                return _from_disk(datasets, local, spec)
            return datasets.load_dataset(path, split=spec, **dict(entry.get("config") or {}))
    except Exception as error:  # datasets and the Hub raise many types; all mean "cannot load"
        text = str(error)
        kind = MissingSplit if "Unknown split" in text or "Bad split" in text else DataError
        raise kind(explain(path, spec, where, error)) from None


def explain(path: str, spec: str, where: str, error: BaseException) -> str:
    """One paragraph for a dataset that cannot be loaded: which, why, and what to do."""
    name = type(error).__name__
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else name
    local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if "Unknown split" in text or "Bad split" in text:
        return (f"{where}: dataset '{path}' has no split for {spec!r} ({first_line}). Set the entry's "
                "train_split / valid_split / test_split to splits it has (slices such as 'train[:90%]' work).")
    if local:
        return (f"{where}: cannot load dataset '{path}': {name}: {first_line}. A local dataset is a folder of data "
                "files (parquet, JSON lines, CSV) or one written by Dataset.save_to_disk.")
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return (f"{where}: dataset '{path}' was not found on the Hugging Face Hub, or it is gated ({name}). "
                "Check the id's spelling (owner/name), the revision, and for gated datasets run "
                "`huggingface-cli login` after accepting its terms on the dataset's page.")
    offline = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError")
    if name in offline or any(word in text for word in offline) or "connect" in text.lower():
        return (f"{where}: dataset '{path}' is not in the Hugging Face cache and the Hub cannot be reached "
                f"({first_line}). Connect once to download it (it is cached for later), copy the cache "
                "(~/.cache/huggingface) from a machine that has it, or save it to a local folder "
                "(Dataset.save_to_disk, or parquet files) and set the entry's path to that folder.")
    if "/" not in path:
        return (f"{where}: dataset '{path}' is neither a local folder nor a Hugging Face id (owner/name). "
                "Fix the path, or give an id such as mlx-community/wikisql.")
    return f"{where}: cannot load dataset '{path}': {name}: {first_line}."


def load_hf_splits(
    entries: list[dict[str, Any]], tokenizer: Any, fmt: RowFormat, required: tuple[str, ...], source: str = ""
) -> dict[str, Dataset]:
    """Our splits from ``data.hf_dataset``'s entries; the ``required`` ones must have rows."""
    out: dict[str, Dataset] = {}
    for split, default in SPLIT_DEFAULTS.items():
        parts: list[Dataset] = []
        for number, entry in enumerate(entries, start=1):
            spec = str(entry.get(f"{split}_split", default) or "")
            if not spec:
                continue
            where = f"{source or 'config'}: data.hf_dataset" + (f" entry {number}" if len(entries) > 1 else "")
            try:
                rows = load_rows(entry, spec, where)
            except MissingSplit:
                if split in required:
                    raise
                continue  # as mlx-lm: a split the dataset lacks is none (tunetop test says so if asked for)
            features = {key: entry[key] for key in FEATURES if entry.get(key)}
            parts.append(rows_to_dataset(rows, tokenizer, replace(fmt, **features), f"{entry['path']}[{spec}]"))
        if parts:
            examples = [example for part in parts for example in part.examples]
            out[split] = Dataset(examples, " + ".join(part.source for part in parts))
        elif split in required:
            raise DataError(
                f"{source or 'config'}: data.hf_dataset gives no {split} split. Set {split}_split in its entry."
            )
    return out
