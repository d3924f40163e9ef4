"""Every warning a run produces is a journaled event, once per cause with a count; over-long
examples keep max_seq_length tokens in rows of their own when packed, not the packed row width."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest

from tests.conftest import tunetop, write_config
from tunetop.training.data import Dataset, DataWarning, Example
from tunetop.training.embedded import embedded_data_path
from tunetop.training.packing import PackPlan
from tunetop.training.run_warnings import WarningSink


def test_a_long_example_keeps_max_seq_length_tokens_in_a_row_of_its_own() -> None:
    examples = [Example(list(range(1, 21)), 0) for _ in range(12)]  # 3 to a row: 4 rows
    examples += [Example(list(range(1, 301)), 5), Example(list(range(1, 151)), 0)]
    with pytest.warns(DataWarning, match=r"d: 1 example longer than data.max_seq_length = 256 tokens \(the longest has 300\)") as caught:
        plan = PackPlan(Dataset(examples, "d"), batch_size=2, width=64, seed=1, max_seq_length=256)
    assert caught[0].message.count == 1  # type: ignore[union-attr]
    assert "2 examples longer than a row train in rows of their own" in plan.describe()
    batches = [b for _e, _k, b in plan.iterate(0, 0, loop=False)]
    assert len(batches) == len(plan) == 3  # two of packed rows, one of the two long rows
    shapes = sorted(b.tokens.shape for b in batches)
    assert shapes == [(2, 65), (2, 65), (2, 257)]  # 256 inputs hold the long examples: 300 -> 256, and 150
    (long,) = [b for b in batches if b.tokens.shape[1] == 257]
    assert sorted(int(row.sum()) for row in long.targets) == [149, 256 - 5]  # each example's own loss
    assert long.tokens[:, :256].tolist().count(list(range(1, 257))) == 1  # the 300-token one, cut at 256


def test_the_sink_emits_each_cause_once_then_its_total() -> None:
    events: list[dict] = []
    with WarningSink(lambda kind, **fields: events.append({"type": kind, **fields})), warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("the same thing", UserWarning, stacklevel=1)
        warnings.warn(DataWarning("five examples cut", count=5), stacklevel=1)
        logging.getLogger("transformers.tokenization_utils_base").warning("Token indices sequence length is long")
        logging.getLogger("transformers.tokenization_utils_base").info("not a warning")
        assert len(events) == 3  # at once: the first of each cause
    assert [(e["message"], e["count"], e["source"]) for e in events] == [
        ("the same thing", 1, "UserWarning"),
        ("five examples cut", 5, "DataWarning"),
        ("Token indices sequence length is long", 1, "transformers"),
        ("the same thing (this warning came 3 times in all)", 3, "UserWarning"),
    ]
    assert not any(type(h).__name__ == "_LogHandler" for h in logging.getLogger("transformers").handlers)


def test_a_run_journals_its_truncation_and_tokenizer_warnings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(embedded_data_path(), data)
    long_text = " ".join(f"Ada has {n} red owls." for n in range(900))  # > the tokenizer's 2048 tokens
    with (data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": long_text}) + "\n")
    with (data / "valid.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": long_text, "completion": "Lisbon."}) + "\n")
    config = write_config(
        tmp_path / "run.toml",
        data={"path": str(data), "packing": "on", "pack_length": 64, "max_seq_length": 384, "mask_prompt": False},
        training={"iterations": 2, "batch_size": 2, "steps_per_report": 1, "steps_per_eval": 2, "validation_batches": 0},
        checkpoints={"save_every": 100},
    )
    result = tunetop("train", str(config), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr and "DataWarning" not in result.stderr
    events = [json.loads(line) for line in tunetop("events", check=True).stdout.splitlines()]
    warned = [e for e in events if e["type"] == "warning"]
    messages = [e["message"] for e in warned]
    train = [e for e in warned if "train.jsonl: 1 example longer than data.max_seq_length = 384" in e["message"]]
    valid = [e for e in warned if "valid.jsonl: 1 example longer than data.max_seq_length = 384" in e["message"]]
    tokenizer = [e for e in warned if e["source"] == "transformers" and "Token indices sequence length" in e["message"]]
    assert len(train) == 1 and len(valid) == 1 and len(tokenizer) == 1, messages
    assert train[0]["count"] == 1 and "cut to its first 384 tokens" in train[0]["message"]
    assert len(messages) == len(set(messages))  # once per cause
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("1 example longer than a row trains" in m or "rows of their own" in m for m in logs), logs

    from tunetop.tui.state import RunState

    state = RunState()
    for event in events:
        state.apply(event)
    shown = [line.message for line in state.logs if line.level == "warning"]
    assert train[0]["message"] in shown and tokenizer[0]["message"] in shown
