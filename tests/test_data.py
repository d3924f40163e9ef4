"""Data formats, prompt masks, errors with file:line, and batching."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.data import (
    BUCKET_WIDTHS,
    BatchPlan,
    DataError,
    Dataset,
    Example,
    bucket_width,
    load_split,
    load_splits,
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from mlx_lm.utils import load_tokenizer

    from engine.demo import embedded_model_path

    return load_tokenizer(embedded_model_path())


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_text_rows_end_with_eos(tmp_path: Path, tokenizer: Any) -> None:
    ds = load_split(write_jsonl(tmp_path / "train.jsonl", [{"text": "Ada lives in Lisbon."}]), tokenizer)
    example = ds.examples[0]
    assert example.tokens[-1] == tokenizer.eos_token_id
    assert example.tokens[:-1] == tokenizer.encode("Ada lives in Lisbon.")
    assert example.offset == 0


def test_txt_is_one_example_per_line(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "train.txt"
    path.write_text("first line\n\nsecond line\n")
    assert len(load_split(path, tokenizer)) == 2


def test_prompt_completion_mask_starts_at_the_completion(tmp_path: Path, tokenizer: Any) -> None:
    row = {"prompt": "Where does Ada live?", "completion": " name=Ada; city=Lisbon."}
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    masked = load_split(path, tokenizer, mask_prompt=True).examples[0]
    unmasked = load_split(path, tokenizer, mask_prompt=False).examples[0]
    assert unmasked.offset == 0 and masked.tokens == unmasked.tokens
    prompt_only = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=True, add_generation_prompt=True
    )
    assert masked.offset == len(prompt_only)
    assert masked.tokens[: masked.offset] == list(prompt_only)
    # What the loss trains on decodes to the completion (plus the end-of-turn marker).
    assert tokenizer.decode(masked.tokens[masked.offset :]).startswith(row["completion"])


def test_chat_messages_mask_the_last_turn_only(tmp_path: Path, tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Where does Bo live?"},
        {"role": "assistant", "content": "name=Bo; city=Osaka."},
    ]
    example = load_split(write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}]), tokenizer, True).examples[0]
    assert tokenizer.decode(example.tokens[example.offset :]).startswith("name=Bo; city=Osaka.")
    assert "Where does Bo live?" in tokenizer.decode(example.tokens[: example.offset])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"train.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n{"question": "x"}\n', r"train.jsonl:2: a row needs 'text'.*found keys question"),
        ('{"prompt": "x"}\n', r"train.jsonl:1: 'prompt' and 'completion' must both be strings"),
        ('["a list"]\n', r"train.jsonl:1: expected a JSON object, got list"),
        ('{"messages": []}\n', r"train.jsonl:1: 'messages' must be a non-empty list"),
        ('{"text": 5}\n', r"train.jsonl:1: 'text' must be a string"),
        ("\n\n", r"train.jsonl: the split is empty"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, tokenizer: Any, content: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_split(path, tokenizer)


def test_binary_and_non_utf8_files_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    binary = tmp_path / "train.jsonl"
    binary.write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(DataError, match="binary file"):
        load_split(binary, tokenizer)
    latin = tmp_path / "valid.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"valid.jsonl:2: not valid UTF-8"):
        load_split(latin, tokenizer)


def test_mask_prompt_on_text_rows_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(DataError, match="mask_prompt needs prompt/completion"):
        load_split(write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}]), tokenizer, mask_prompt=True)


def test_missing_required_split(tmp_path: Path, tokenizer: Any) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="no valid.jsonl or valid.txt"):
        load_splits(tmp_path, tokenizer)


def _dataset(lengths: list[int]) -> Dataset:
    return Dataset([Example(list(range(1, n + 1))) for n in lengths], "synthetic")


def test_batches_group_examples_of_similar_true_length() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 500, size=64)]
    plan = BatchPlan(_dataset(lengths), batch_size=8, max_seq_length=2048)
    sorted_lengths = sorted(lengths)
    for k, members in enumerate(plan.batches):
        assert sorted(lengths[i] for i in members) == sorted_lengths[k * 8 : (k + 1) * 8]


def test_few_distinct_shapes() -> None:
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.lognormal(5.0, 0.8, size=2000).clip(3, 2000)]
    plan = BatchPlan(_dataset(lengths), batch_size=4, max_seq_length=2048)
    widths = {plan.make_batch(m).tokens.shape[1] for m in plan.batches}
    assert {w - 1 for w in widths} <= set(BUCKET_WIDTHS)  # the inputs are a bucket long
    assert len(widths) <= 12  # vs. hundreds of distinct padded lengths without buckets


def test_bucket_width_and_truncation() -> None:
    # A row holds a bucket of inputs plus one last target: inputs of 128, 512, 2048 (multiples of
    # 128: MLX's fused attention backward on CUDA) for examples of up to 129, 513, 2049 tokens.
    assert bucket_width(1, 2048) == 33
    assert bucket_width(33, 2048) == 33
    assert bucket_width(34, 2048) == 65
    assert bucket_width(512, 2048) == 513
    assert bucket_width(513, 2048) == 513
    assert bucket_width(5000, 2048) == 2048 + 1  # examples keep 2048 tokens: 2047 inputs, padded to 2048
    assert bucket_width(900, 1000) == 1001


def test_long_sequences_warn_once_per_dataset_with_the_count() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = BatchPlan(_dataset([100] * 8), batch_size=2, max_seq_length=50)
        batches = [plan.make_batch(m) for m in plan.batches]
    assert len(caught) == 1 and "8 examples longer than data.max_seq_length = 50" in str(caught[0].message)
    assert caught[0].message.count == 8  # type: ignore[union-attr]
    assert all(b.tokens.shape == (2, 51) for b in batches)
    assert all((b.lengths[:, 1] == 50).all() for b in batches)


def test_padding_and_lengths() -> None:
    ds = Dataset([Example([1, 2, 3], offset=1), Example([4, 5, 6, 7, 8])], "x")
    batch = BatchPlan(ds, batch_size=2, max_seq_length=2048).make_batch([0, 1])
    assert batch.tokens.shape == (2, 33)
    assert batch.tokens[0, :4].tolist() == [1, 2, 3, 0]
    assert batch.lengths.tolist() == [[1, 3], [0, 5]]
    assert batch.real_tokens == (3 - 1) + (5 - 1)


def test_order_is_seeded_and_resumable() -> None:
    plan = BatchPlan(_dataset(list(range(10, 74))), batch_size=4, max_seq_length=2048, seed=3)
    full = [(e, k, b.tokens.tolist()) for (e, k, b), _ in zip(plan.iterate(), range(40), strict=False)]
    resumed = [(e, k, b.tokens.tolist()) for (e, k, b), _ in zip(plan.iterate(epoch=1, index=5), range(19), strict=False)]
    assert full[21:] == resumed
    other_seed = BatchPlan(_dataset(list(range(10, 74))), batch_size=4, max_seq_length=2048, seed=4)
    assert other_seed.epoch_order(0).tolist() != plan.epoch_order(0).tolist()


def test_batch_size_larger_than_dataset() -> None:
    with pytest.raises(DataError, match="has 3 examples but batch_size is 4"):
        BatchPlan(_dataset([5, 6, 7]), batch_size=4, max_seq_length=2048)
