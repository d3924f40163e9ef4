"""The token cache (tunetop.training.token_cache): the same splits as tokenizing, tokenized once, safe to share (issue 22)."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunetop.training import token_cache
from tunetop.training.data import Dataset, RowFormat, load_split
from tunetop.training.token_cache import cache_folder, load_split_cached


class CountingTokenizer:
    """Bytes as tokens, with files on disk (as a Hugging Face tokenizer has) and a count of its calls."""

    eos_token_id = 0
    chat_template = None

    def __init__(self, folder: Path) -> None:
        self.name_or_path = str(folder)
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode())

    def apply_chat_template(self, messages: list[Any], **kwargs: Any) -> Any:
        raise AssertionError("no chat template")


@pytest.fixture
def tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CountingTokenizer:
    monkeypatch.setenv("TUNETOP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": "bytes"}')
    return CountingTokenizer(folder)


def write_split(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [{"prompt": f"question {i} " * (i % 7 + 1), "completion": f"answer {i}"} for i in range(50)]


def same(a: Dataset, b: Dataset) -> bool:
    return a.examples == b.examples and a.prompt_format == b.prompt_format and a.row_format == b.row_format


def test_a_split_is_tokenized_once_and_read_back_the_same(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    split = write_split(tmp_path / "data" / "train.jsonl", ROWS)
    fmt = RowFormat(mask_prompt=True)
    first = load_split_cached(split, tokenizer, row_format=fmt)  # type: ignore[arg-type]
    calls = tokenizer.calls
    assert calls > 0 and len(list(cache_folder().glob("*.npz"))) == 1
    again = load_split_cached(split, tokenizer, row_format=fmt)  # type: ignore[arg-type]
    assert tokenizer.calls == calls  # not tokenized again
    assert same(again, first) and same(again, load_split(split, tokenizer, row_format=fmt))  # type: ignore[arg-type]
    assert all(type(t) is int for e in again.examples for t in e.tokens)


def test_what_decides_the_tokens_is_in_the_key(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    split = write_split(tmp_path / "data" / "train.jsonl", ROWS)
    load_split_cached(split, tokenizer, row_format=RowFormat())  # type: ignore[arg-type]
    variants = [
        lambda: load_split_cached(split, tokenizer, row_format=RowFormat(mask_prompt=True)),  # the row format
        lambda: (write_split(split, ROWS[:-1]), load_split_cached(split, tokenizer, row_format=RowFormat()))[1],  # the data
        lambda: ((Path(tokenizer.name_or_path) / "tokenizer.json").write_text('{"model": "other"}'),  # the tokenizer
                 load_split_cached(split, tokenizer, row_format=RowFormat()))[1],
    ]
    for number, load in enumerate(variants, start=2):
        before = tokenizer.calls
        dataset = load()  # type: ignore[no-untyped-call]
        assert tokenizer.calls > before and len(list(cache_folder().glob("*.npz"))) == number
        assert same(dataset, load_split(split, tokenizer, row_format=dataset.row_format))  # type: ignore[arg-type]
    # The same bytes under another name are the same entry (the messages name the file read).
    copy = write_split(tmp_path / "elsewhere" / "train.jsonl", ROWS[:-1])
    before = tokenizer.calls
    assert load_split_cached(copy, tokenizer, row_format=RowFormat()).source == str(copy)  # type: ignore[arg-type]
    assert tokenizer.calls == before


def test_a_tokenizer_without_files_is_not_cached(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    split = write_split(tmp_path / "data" / "train.jsonl", ROWS)
    tokenizer.name_or_path = ""
    load_split_cached(split, tokenizer, row_format=RowFormat())  # type: ignore[arg-type]
    assert not cache_folder().exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped", "empty", "other key"])
def test_a_damaged_entry_is_tokenized_again_and_replaced(tmp_path: Path, tokenizer: CountingTokenizer, damage: str) -> None:
    split = write_split(tmp_path / "data" / "train.jsonl", ROWS)
    other = write_split(tmp_path / "data" / "valid.jsonl", ROWS[:5])
    expected = load_split_cached(split, tokenizer, row_format=RowFormat())  # type: ignore[arg-type]
    (entry,) = cache_folder().glob("*.npz")
    raw = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(len(raw)))
    elif damage == "flipped":  # a bit flipped inside the token array: the zip's CRC catches it
        at = raw.index(b"tokens.npy") + 400
        entry.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a whole, valid entry of another split under this one's name
        load_split_cached(other, tokenizer, row_format=RowFormat())  # type: ignore[arg-type]
        (other_entry,) = [p for p in cache_folder().glob("*.npz") if p != entry]
        entry.write_bytes(other_entry.read_bytes())
    before = tokenizer.calls
    again = load_split_cached(split, tokenizer, row_format=RowFormat())  # type: ignore[arg-type]
    assert tokenizer.calls > before and same(again, expected)
    calls = tokenizer.calls
    assert same(load_split_cached(split, tokenizer, row_format=RowFormat()), expected)  # type: ignore[arg-type]
    assert tokenizer.calls == calls  # the entry was written anew


def _writer(entry: str, key: str, dataset: Dataset, rounds: int) -> None:
    for _ in range(rounds):
        token_cache.write_entry(Path(entry), key, dataset)


def test_concurrent_writers_never_show_a_reader_half_an_entry(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    rows = [{"text": "x" * (i % 300 + 1)} for i in range(3000)]  # a few hundred KB: writes take a while
    dataset = load_split(write_split(tmp_path / "train.jsonl", rows), tokenizer)  # type: ignore[arg-type]
    entry = tmp_path / "cache" / "tokens" / "entry.npz"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(str(entry), "k", dataset, 15)) for _ in range(3)]
    for writer in writers:
        writer.start()
    reads = whole = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        found = token_cache.read_entry(entry, "k")
        reads += 1
        if found is not None:
            whole += 1
            assert found[0] == dataset.examples and found[1] == dataset.prompt_format
        else:  # once one writer has renamed its file into place, the entry is always there, whole
            assert whole == 0, f"read {reads} found no whole entry after {whole} whole ones"
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert whole > 0 and not list(entry.parent.glob(".tmp-*"))


def test_old_entries_go_when_the_cache_is_full(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    folder = cache_folder()
    folder.mkdir(parents=True)
    for number in range(5):
        (folder / f"{number}.npz").write_bytes(b"x" * 1000)
        os.utime(folder / f"{number}.npz", (number, number))
    stale = folder / ".tmp-dead.npz"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    token_cache.prune(folder, keep=folder / "0.npz", limit=2500)
    assert sorted(p.name for p in folder.iterdir()) == ["0.npz", "4.npz"]  # the newest and the one just written


def test_the_run_loads_its_data_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded model and data: a second load reads the cache, with the tokenizer never asked."""
    from tunetop.training import config
    from tunetop.training.build import load_model_and_tokenizer
    from tunetop.training.datasource import load_run_splits
    from tunetop.training.embedded import embedded_dir

    cfg = config.parse(config.starter_text())
    _model, tokenizer, _path = load_model_and_tokenizer(cfg)
    built = embedded_dir()
    monkeypatch.setenv("TUNETOP_CACHE", str(tmp_path / "cache"))  # an empty token cache; the embedded files as they are
    (tmp_path / "cache").mkdir()
    os.symlink(built, embedded_dir())
    first = load_run_splits(cfg, tokenizer)
    assert len(list(cache_folder().glob("*.npz"))) == len(first)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenizer, "apply_chat_template", refuse)
    monkeypatch.setattr(tokenizer, "encode", refuse)
    again = load_run_splits(cfg, tokenizer)
    assert again.keys() == first.keys() and all(same(again[k], first[k]) for k in first)
    assert np.mean([e.offset > 0 for e in again["train"].examples]) == 1.0  # data.mask_prompt in the starter config



class WarningTokenizer(CountingTokenizer):
    """Logs a warning the way transformers' tokenizers do for a long text."""

    def encode(self, text: str) -> list[int]:
        import logging

        if len(text) > 40:
            logging.getLogger("transformers.tokenization_utils_base").warning("Token indices sequence length is long")
        return super().encode(text)


def test_a_cache_hit_says_again_what_tokenizing_said(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    """A run's warnings do not depend on the cache: the tokenizer's logged warning comes on a hit too."""
    from tunetop.training.run_warnings import WarningSink

    talking = WarningTokenizer(Path(tokenizer.name_or_path))
    split = write_split(tmp_path / "data" / "train.jsonl", ROWS)
    seen = []
    for _ in range(2):  # a miss, then a hit
        said: list[dict[str, Any]] = []
        with WarningSink(lambda _type, said=said, **fields: said.append(fields)):
            load_split_cached(split, talking)
        seen.append([s["message"] for s in said if s["source"] == "transformers"])
    assert seen[0] and seen[0][0] == "Token indices sequence length is long"
    assert seen[1] == seen[0]  # the same warnings, the same totals
    calls = talking.calls
    load_split_cached(split, talking)
    assert talking.calls == calls


def test_a_fifo_split_is_refused_not_hashed(tmp_path: Path, tokenizer: CountingTokenizer) -> None:
    """Hashing a named pipe for the cache key waited for a writer forever; load_split refuses it first."""
    from tunetop.training.data import DataError

    fifo = tmp_path / "data" / "train.jsonl"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a data file"):
        load_split_cached(fifo, tokenizer)
