"""Tokenized splits kept between runs: a run, a resume or ``tunetop test`` on the same data starts without tokenizing it again.

An entry is keyed by what decides the tokens: the tokenizer (its files, chat template and end
tokens, and the versions of transformers and mlx-lm that apply it), the split file's bytes and
suffix, and the row format (keys, prompt mask, chat template). It lives under the cache folder
(``$TUNETOP_CACHE/tokens``, see :func:`tunetop.training.embedded.cache_root`) as one ``.npz`` file per split:
written to a temporary file and renamed into place, so a reader sees a whole entry or none, and
writers racing on one key each put down a whole, identical file. An entry that cannot be read,
whose zip checksums fail or whose contents do not match its key is ignored and written anew. A
tokenizer without files on disk (a test's stand-in) is never cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tunetop.training.data import Dataset, Example, RowFormat, Tokenizer, load_split
from tunetop.training.run_warnings import LOGGERS
from tunetop.userfiles import not_a_regular_file

FORMAT_VERSION = 2
"""Bump when the tokens a row becomes change (tunetop.training.data), or what an entry holds: every older entry then misses.
2: entries keep the warnings the libraries logged while tokenizing."""
MAX_CACHE_BYTES = 2_000_000_000
"""Past this, the least recently used entries are deleted."""
STALE_TEMP_SECONDS = 3600
"""A temporary file this old belongs to a writer that died: it goes at the next prune."""
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template", "spiece",
                    "sentencepiece")


def cache_folder() -> Path:
    from tunetop.training.embedded import cache_root

    return cache_root() / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A digest of everything about ``tokenizer`` that decides tokens; None when it has no files."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    folder = Path(str(getattr(inner, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().startswith(_TOKENIZER_FILES))
    if not files:
        return None
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    template = getattr(inner, "chat_template", None)
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
    digest.update(json.dumps([type(inner).__name__, template, getattr(tokenizer, "eos_token_id", None), eos,
                              _versions()], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("transformers", "tokenizers", "mlx-lm"):
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=none")
    return found


def entry_key(path: Path, tokenizer_digest: str, fmt: RowFormat) -> str:
    """The key of ``path`` tokenized by that tokenizer with that row format."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, tokenizer_digest, path.suffix, fmt.__dict__], sort_keys=True).encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_split_cached(
    path: Path, tokenizer: Tokenizer, mask_prompt: bool = False, row_format: RowFormat | None = None
) -> Dataset:
    """:func:`tunetop.training.data.load_split`, through the cache: the same Dataset, tokenized at most once."""
    fmt = row_format or RowFormat(mask_prompt=mask_prompt)
    digest = tokenizer_fingerprint(tokenizer)
    if digest is None or not_a_regular_file(path):  # load_split refuses a FIFO before reading it; hashing would hang
        return load_split(path, tokenizer, row_format=fmt)
    try:
        key = entry_key(path, digest, fmt)
    except OSError:
        return load_split(path, tokenizer, row_format=fmt)  # load_split says what is wrong with the file
    entry = cache_folder() / f"{key}.npz"
    found = read_entry(entry, key)
    if found is not None:
        examples, prompt_format, replayed = found
        for name, message in replayed:  # what tokenizing said the first time, said again: a run's warnings do not depend on the cache
            logging.getLogger(name).warning(message)
        return Dataset(examples, str(path), prompt_format, fmt)
    with _LoggedWarnings() as logged:
        dataset = load_split(path, tokenizer, row_format=fmt)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run time
        write_entry(entry, key, dataset, logged.records)
        prune(entry.parent, keep=entry)
    return dataset


class _LoggedWarnings(logging.Handler):
    """Records the libraries' logged warnings while a split is tokenized (they still reach every other handler)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.getMessage()))

    def __enter__(self) -> _LoggedWarnings:
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)


def read_entry(entry: Path, key: str) -> tuple[list[Example], str, list[tuple[str, str]]] | None:
    """The examples, prompt format and logged warnings stored at ``entry``, or None if absent, damaged or not for ``key``."""
    try:
        with np.load(entry, allow_pickle=False) as stored:
            meta = json.loads(bytes(stored["meta"]).decode())
            tokens, lengths, offsets = stored["tokens"], stored["lengths"], stored["offsets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    if (
        meta.get("key") != key
        or meta.get("version") != FORMAT_VERSION
        or lengths.ndim != 1
        or offsets.shape != lengths.shape
        or int(lengths.sum()) != tokens.size
        or len(lengths) != meta.get("count")
        or (lengths < 0).any()
    ):
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # recently used: pruned last
    bounds = np.cumsum(lengths)[:-1]
    examples = [Example(row.tolist(), int(offset)) for row, offset in zip(np.split(tokens, bounds), offsets, strict=True)]
    logged = [(str(name), str(message)) for name, message in meta.get("warnings", [])]
    return examples, str(meta["prompt_format"]), logged


def write_entry(entry: Path, key: str, dataset: Dataset, logged: list[tuple[str, str]] | None = None) -> None:
    """Store ``dataset`` at ``entry``, atomically (a temporary file renamed into place)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(e.tokens) for e in dataset.examples], dtype=np.int64)
    tokens = np.fromiter((t for e in dataset.examples for t in e.tokens), dtype=np.int32, count=int(lengths.sum()))
    meta = {"key": key, "version": FORMAT_VERSION, "count": len(lengths), "prompt_format": dataset.prompt_format,
            "warnings": logged or []}
    handle, temp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, tokens=tokens, lengths=lengths, offsets=np.array([e.offset for e in dataset.examples], dtype=np.int64),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(temp, entry)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def prune(folder: Path, keep: Path, limit: int = MAX_CACHE_BYTES) -> None:
    """Delete the least recently used entries until the folder holds at most ``limit`` bytes."""
    entries = []
    for temp in folder.glob(".tmp-*"):  # a writer killed before its rename
        with contextlib.suppress(OSError):
            if time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
    for path in folder.glob("*.npz"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != keep:
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size
