"""Rows become what mlx-lm's own dataset code makes of them: the same tokens, the same prompt offset.

Every row format mlx_lm.lora accepts is tokenized by the installed mlx-lm's ``create_dataset`` and
by tunetop's data layer, with a chat template that renders tools, tool calls and the tool role,
and the two are compared token for token.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any

import pytest

from tunetop.training import config as config_module
from tunetop.training.data import BatchPlan, DataError, RowFormat, load_split
from tunetop.training.datasource import row_format

# Renders a tools list, each message's role and content, and assistant tool calls.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|system|>tools: {{ tools | tojson }}</s>{% endif -%}"
    "{%- for m in messages -%}<|{{ m.role }}|>{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{%- endfor %}</s>{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Today's weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Lisbon"}}}

ROWS: dict[str, dict[str, Any]] = {
    "text": {"text": "Ada lives in Lisbon."},
    "completion": {"prompt": "Where does Ada live?", "completion": "In Lisbon."},
    "completion with tools": {"prompt": "Weather in Lisbon?", "completion": "Sunny.", "tools": TOOLS},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "chat with system": {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Where does Bo live?"},
            {"role": "assistant", "content": "Osaka."},
        ]
    },
    "multi-turn": {
        "messages": [
            {"role": "user", "content": "Where does Bo live?"},
            {"role": "assistant", "content": "Osaka."},
            {"role": "user", "content": "And Ada?"},
            {"role": "assistant", "content": "Lisbon."},
        ]
    },
    "tool calls and tools": {
        "messages": [
            {"role": "user", "content": "Weather in Lisbon?"},
            {"role": "assistant", "tool_calls": [CALL]},  # no content, as OpenAI's format has it
            {"role": "tool", "content": "sunny, 24C"},
            {"role": "assistant", "content": "Sunny and 24C."},
        ],
        "tools": TOOLS,
    },
    "ends with a tool call": {
        "messages": [{"role": "user", "content": "Weather in Lisbon?"}, {"role": "assistant", "tool_calls": [CALL]}],
        "tools": TOOLS,
    },
    "ends with the tool's answer": {
        "messages": [
            {"role": "user", "content": "Weather in Lisbon?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
        ],
        "tools": TOOLS,
    },
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The embedded model's tokenizer with a chat template that renders tools (for mlx-lm's side)."""
    from mlx_lm.utils import load_tokenizer

    from tunetop.training.embedded import embedded_model_path

    tokenizer = load_tokenizer(embedded_model_path())
    tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def mlx_lm_example(row: dict[str, Any], tokenizer: Any, **options: Any) -> tuple[list[int], int]:
    """(tokens, offset) as mlx_lm.lora makes them: its create_dataset, then its process step."""
    from mlx_lm.tuner.datasets import create_dataset

    dataset = create_dataset([copy.deepcopy(row)], tokenizer, types.SimpleNamespace(**options))
    tokens, offset = dataset.process(dataset[0])
    return list(tokens), offset


def tunetop_example(tmp_path: Path, row: dict[str, Any], tokenizer: Any, fmt: RowFormat) -> tuple[list[int], int]:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    example = load_split(path, tokenizer, row_format=fmt).examples[0]
    return example.tokens, example.offset


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("name", list(ROWS))
def test_every_row_format_tokenizes_as_mlx_lm_does(
    tmp_path: Path, tokenizer: Any, name: str, mask_prompt: bool
) -> None:
    row = ROWS[name]
    if name == "text" and mask_prompt:
        pytest.skip("mlx-lm refuses mask_prompt on text rows, as tunetop does (test_data.py)")
    expected = mlx_lm_example(row, tokenizer, mask_prompt=mask_prompt)
    got = tunetop_example(tmp_path, row, tokenizer, RowFormat(mask_prompt=mask_prompt))
    assert got == expected
    if "tools" in row:  # the tools are in the text trained on
        assert "weather" in tokenizer.decode(got[0])


def test_the_batch_holds_the_same_tokens_and_prompt_offset(tmp_path: Path, tokenizer: Any) -> None:
    """What reaches the loss: mlx-lm's iterate_batches row and (offset, length) against tunetop's."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    row = ROWS["tool calls and tools"]
    dataset = create_dataset([copy.deepcopy(row)], tokenizer, types.SimpleNamespace(mask_prompt=True))
    theirs, their_lengths = next(iterate_batches(CacheDataset(dataset), 1, 2048))
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ours = BatchPlan(load_split(path, tokenizer, row_format=RowFormat(mask_prompt=True)), 1, 2048).make_batch([0])
    offset, length = their_lengths.tolist()[0]
    assert ours.lengths.tolist() == [[offset, length]]
    assert ours.tokens[0, :length].tolist() == theirs[0, :length].tolist()


def test_custom_feature_names(tmp_path: Path, tokenizer: Any) -> None:
    names = {"text_feature": "body", "prompt_feature": "question", "completion_feature": "answer", "chat_feature": "turns"}
    fmt = RowFormat(**names, mask_prompt=False)
    rows = [
        {"body": "Ada lives in Lisbon."},
        {"question": "Where does Ada live?", "answer": "Lisbon.", "tools": TOOLS},
        {"turns": ROWS["tool calls and tools"]["messages"], "tools": TOOLS},
    ]
    for row in rows:
        assert tunetop_example(tmp_path, row, tokenizer, fmt) == mlx_lm_example(row, tokenizer, **names)
    with pytest.raises(DataError, match=r"a row needs 'body', 'question' and 'answer', or 'turns'; found keys text"):
        tunetop_example(tmp_path, {"text": "x"}, tokenizer, fmt)


def test_a_chat_template_override_renders_as_the_tokenizer_would_with_it(tmp_path: Path, tokenizer: Any) -> None:
    """``data.chat_template`` as a file next to the config, and as a tokenizer's template name."""
    from mlx_lm.utils import load_tokenizer

    from tunetop.training.embedded import embedded_model_path

    plain = load_tokenizer(embedded_model_path())  # the embedded template ignores tools and tool calls
    row = ROWS["tool calls and tools"]
    expected = mlx_lm_example(row, tokenizer, mask_prompt=True)
    assert tunetop_example(tmp_path, row, plain, RowFormat(mask_prompt=True)) != expected

    (tmp_path / "tools.jinja").write_text(TOOLS_TEMPLATE)
    (tmp_path / "run.toml").write_text('[data]\nchat_template = "tools.jinja"\nmask_prompt = true\n')
    cfg = config_module.load(tmp_path / "run.toml")
    assert cfg.data.chat_template == str(tmp_path / "tools.jinja")
    assert tunetop_example(tmp_path, row, plain, row_format(cfg.data, plain)) == expected

    named = load_tokenizer(embedded_model_path())
    named._tokenizer.chat_template = {"default": plain.chat_template, "tool_use": TOOLS_TEMPLATE}
    cfg.data.chat_template = "tool_use"
    assert tunetop_example(tmp_path, row, named, row_format(cfg.data, named)) == expected

    cfg.data.chat_template = "no_such_template"
    with pytest.raises(DataError, match=r"neither a file nor one of this tokenizer's named chat templates \(default, tool_use\)"):
        row_format(cfg.data, named)
