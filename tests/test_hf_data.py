"""data.hf_dataset: Hugging Face datasets through the ``datasets`` library, on datasets these tests
save locally (parquet files, save_to_disk), compared with mlx-lm's own loader on the same entry."""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")

from engine import config as config_module  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.data import DataError, RowFormat  # noqa: E402
from engine.datasource import load_run_splits  # noqa: E402
from engine.hf_data import load_hf_splits  # noqa: E402
from tests.conftest import tunetop, write_config  # noqa: E402
from tests.test_data_parity import ROWS, TOOLS_TEMPLATE  # noqa: E402


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset writes Arrow caches of local files: into the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from mlx_lm.utils import load_tokenizer

    from engine.demo import embedded_model_path

    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def chat_rows(count: int) -> list[dict[str, Any]]:
    """Tool-calling chats under a custom feature name, varied so every row differs."""
    out = []
    for n in range(count):
        row = copy.deepcopy(ROWS["tool calls and tools"])
        row["messages"][-1]["content"] = f"Sunny and {n} degrees."
        out.append({"turns": row["messages"], "tools": row["tools"]})
    return out


def test_a_parquet_dataset_loads_as_mlx_lm_loads_it(tmp_path: Path, tokenizer: Any) -> None:
    from mlx_lm.tuner.datasets import load_custom_hf_dataset

    folder = tmp_path / "chats"
    folder.mkdir()
    datasets.Dataset.from_list(chat_rows(20)).to_parquet(str(folder / "train.parquet"))
    entry = {"path": str(folder), "chat_feature": "turns", "valid_split": "train[-20%:]"}
    fmt = RowFormat(mask_prompt=True)
    ours = load_hf_splits([dict(entry)], tokenizer, fmt, ("train", "valid"))
    args = types.SimpleNamespace(hf_dataset=dict(entry), mask_prompt=True, train=True, test=False)
    their_train, their_valid, _test = load_custom_hf_dataset(args, tokenizer)
    for split, theirs in (("train", their_train), ("valid", their_valid)):
        expected = [theirs.process(theirs[i]) for i in range(len(theirs))]
        got = [(e.tokens, e.offset) for e in ours[split].examples]
        assert got == [(list(t), o) for t, o in expected], split
    assert (len(ours["train"]), len(ours["valid"])) == (16, 4)  # mlx-lm's train[:80%], and our valid slice
    assert ours["train"].source == f"{folder}[train[:80%]]"


def test_a_saved_dataset_dict_gives_its_splits_and_features(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"question": f"Where does user {n} live?", "answer": f"City {n}."} for n in range(12)]
    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[:8]),
        "dev": datasets.Dataset.from_list(rows[8:10]),
        "test": datasets.Dataset.from_list(rows[10:]),
    })
    saved.save_to_disk(str(tmp_path / "qa"))
    (tmp_path / "run.toml").write_text(
        '[data]\nmask_prompt = true\nprompt_feature = "question"\ncompletion_feature = "answer"\n'
        '[data.hf_dataset]\npath = "qa"\ntrain_split = "train[:6]+dev"\nvalid_split = "train[6:]"\ntest_split = "test"\n'
    )
    cfg = config_module.load(tmp_path / "run.toml")
    assert cfg.data.hf_dataset == [{"path": str(tmp_path / "qa"), "train_split": "train[:6]+dev",
                                    "valid_split": "train[6:]", "test_split": "test"}]
    splits = load_run_splits(cfg, tokenizer)
    assert {name: len(split) for name, split in splits.items()} == {"train": 8, "valid": 2, "test": 2}
    last = splits["train"].examples[-1]  # the dev split's second row, after train[:6]
    assert tokenizer.decode(last.tokens[last.offset :]).startswith("City 9.")


def test_missing_splits_and_bad_entries_are_named(tmp_path: Path, tokenizer: Any) -> None:
    datasets.Dataset.from_list([{"text": f"row {n}"} for n in range(5)]).save_to_disk(str(tmp_path / "one"))
    entry = {"path": str(tmp_path / "one"), "valid_split": "validation"}
    with pytest.raises(DataError, match=r"data.hf_dataset: dataset '.*one' has no split for 'validation'"):
        load_hf_splits([entry], tokenizer, RowFormat(), ("train", "valid"))
    # A split nobody requires is left out when the dataset lacks it, as mlx-lm leaves it out.
    entry = {"path": str(tmp_path / "one"), "valid_split": "train[:1]", "test_split": "test"}
    assert sorted(load_hf_splits([entry], tokenizer, RowFormat(), ("train", "valid"))) == ["train", "valid"]
    with pytest.raises(ConfigError, match=r"unknown key 'train_slice' in data.hf_dataset. Did you mean 'train_split'\?"):
        config_module.parse('[data.hf_dataset]\npath = "x/y"\ntrain_slice = "train"\n')
    with pytest.raises(ConfigError, match=r"data.hf_dataset entry 2 needs a 'path'"):
        config_module.parse('[[data.hf_dataset]]\npath = "x/y"\n[[data.hf_dataset]]\ntrain_split = "train"\n')


def test_without_the_datasets_library_the_error_says_what_to_install(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(DataError, match=r"need the 'datasets' library: pip install 'tunetop\[hf\]'"):
        load_hf_splits([{"path": "owner/name"}], tokenizer, RowFormat(), ("train",))


def test_a_run_trains_on_an_hf_dataset_and_an_uncached_one_offline_is_a_clear_error(tmp_path: Path) -> None:
    from engine.demo import embedded_data_path

    rows = [json.loads(line) for line in (embedded_data_path() / "train.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "facts" / "train.parquet"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    config = write_config(tmp_path / "run.toml", data={"hf_dataset": {"path": "facts"}},
                          training={"iterations": 3, "steps_per_eval": 3, "steps_per_report": 1})
    result = tunetop("train", str(config), env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in tunetop("events", check=True).stdout.splitlines()]
    assert [e["iteration"] for e in events if e["type"] == "train"] == [1, 2, 3]
    assert any(e["type"] == "validation" for e in events)

    config = write_config(tmp_path / "run.toml", data={"hf_dataset": {"path": "nobody/no-such-dataset"}})
    result = tunetop("train", str(config), env=env)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "dataset 'nobody/no-such-dataset' is not in the Hugging Face cache and the Hub cannot be reached" in output
    assert "Traceback" not in output
