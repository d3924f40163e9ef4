"""Training data: files -> token sequences -> length-sorted, shape-bucketed batches.

A data directory holds ``train``, ``valid`` and (optionally) ``test`` splits, each as ``.jsonl``
or ``.txt``. JSONL rows are one of (the key names are :class:`RowFormat`'s, mlx-lm's defaults):

* ``{"text": ...}``                      plain text
* ``{"prompt": ..., "completion": ...}`` rendered with the chat template when the tokenizer has one
* ``{"messages": [{"role", ...}]}``      rendered with the tokenizer's chat template

A row's ``tools`` go to the chat template with its messages. Rows become exactly the tokens and
prompt offsets mlx-lm's ``create_dataset`` makes of them (tests/test_data_parity.py checks it
against the installed mlx-lm), except that tunetop picks the format per row rather than from the
first row, and renders prompt/completion rows without a chat template as plain text.

``.txt`` files hold one example per line, as in mlx-swift-lm. ``mask_prompt`` trains on the
completion (or last message) only: each example carries the offset where its loss starts. A split
remembers how its prompts were put to the model (:attr:`Dataset.prompt_format`), so a prompt
sampled from the trained model is put to it the same way (:func:`prompt_tokens`).

Batching sorts examples by their true token length (mlx-lm 0.32 sorts by the number of dict
keys, its issue #596), and pads every batch up to one of a few bucket widths, because each new
padded shape costs a recompilation of the compiled step. A row is one token longer than its
bucket, so the model's input (every token but the last) is the bucket's length: from 128 up a
multiple of 128, which MLX's CUDA attention needs for its fused (cuDNN) backward pass; at any
other length it materialises every attention score (docs/PERFORMANCE.md).

Longer than most modules because every row format mlx-lm reads, and the batching that
follows, stay in one place: tests/test_data_parity.py holds all of it to mlx-lm at once.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tunetop.userfiles import not_a_regular_file

SPLITS = ("train", "valid", "test")
# Input lengths a batch is padded to (its rows are one token longer).
BUCKET_WIDTHS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


class DataError(ValueError):
    """Bad or missing data, with file and line in the message."""


class DataWarning(UserWarning):
    """Something about the data worth knowing (examples cut short...); ``count`` is how many
    examples it concerns, so a run reports each cause once."""

    def __init__(self, message: str, count: int = 1) -> None:
        super().__init__(message)
        self.count = count


class Tokenizer(Protocol):
    """The part of a tokenizer the data layer uses (mlx-lm's TokenizerWrapper fits)."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[Any], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class RowFormat:
    """How JSONL rows read: which keys hold what (mlx-lm's ``*_feature`` names), the prompt mask,
    and the chat template to render with.

    ``chat_template`` is the template's Jinja text, or the name of one of the tokenizer's named
    templates; None renders with the tokenizer's own (see :func:`resolve_chat_template`).
    """

    text_feature: str = "text"
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    chat_feature: str = "messages"
    mask_prompt: bool = False
    chat_template: str | None = None


@dataclass(frozen=True)
class Example:
    """One tokenized example; the loss covers tokens from ``offset`` on."""

    tokens: list[int]
    offset: int = 0


PROMPT_FORMATS = ("chat", "completion", "text")
"""How a split's prompts were put to the model: in the chat template (chat rows, or prompt/completion
rows with a chat template), as plain prompt text before the completion, or raw text."""


@dataclass
class Dataset:
    """A tokenized split. ``source`` names the file for messages; ``prompt_format`` is the format
    most of its rows had (one of :data:`PROMPT_FORMATS`) and ``row_format`` how they were read,
    for putting a sampled prompt to the model the same way (:func:`prompt_tokens`)."""

    examples: list[Example]
    source: str
    prompt_format: str = "text"
    row_format: RowFormat = field(default_factory=RowFormat)

    def __len__(self) -> int:
        return len(self.examples)


def _has_chat_template(tokenizer: Any, fmt: RowFormat) -> bool:
    if fmt.chat_template is not None:
        return True
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def _chat_tokens(tokenizer: Tokenizer, fmt: RowFormat, messages: list[Any], tools: Any, **kwargs: Any) -> list[int]:
    # The call mlx-lm's datasets make (tools, return_dict=False), so the tokens are the same.
    if fmt.chat_template is not None:
        kwargs["chat_template"] = fmt.chat_template
    out = tokenizer.apply_chat_template(messages, tools=tools, return_dict=False, **kwargs)
    if isinstance(out, dict):  # transformers >= 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def template_names(tokenizer: Any) -> list[str]:
    """The names of a tokenizer's named chat templates (Hugging Face keeps several as a dict)."""
    templates = getattr(tokenizer, "chat_template", None)
    return sorted(templates) if isinstance(templates, dict) else []


def resolve_chat_template(value: str, tokenizer: Any, where: str = "data.chat_template") -> str | None:
    """``data.chat_template`` as ``RowFormat.chat_template``: "" = the tokenizer's own (None); a
    file's text; a name of one of the tokenizer's templates; or the Jinja text itself."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{where}: cannot read the chat template file {path}: {error}.") from None
    if value in template_names(tokenizer) or "{{" in value or "{%" in value:
        return value
    names = ", ".join(template_names(tokenizer)) or "it has none"
    raise DataError(
        f"{where}: {value!r} is neither a file nor one of this tokenizer's named chat templates ({names}). "
        "Give the path of a Jinja template file, a template name, or the template text itself."
    )


def _with_eos(tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens = [*tokens, eos]
    return tokens


def _tools(row: dict[str, Any], where: str) -> Any:
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of tool definitions (objects), got {type(tools).__name__}.")
    return tools


def prompt_tokens(tokenizer: Tokenizer, prompt: str, prompt_format: str, fmt: RowFormat | None = None) -> list[int]:
    """``prompt`` as the model saw prompts in data of ``prompt_format`` read with ``fmt``: what it
    learned to continue.

    ``chat``: one user message in the chat template (``fmt``'s, else the tokenizer's), with the
    assistant's turn opened: what ``mlx_lm.generate`` builds from a prompt on a model with a chat
    template. ``completion`` and ``text``: the text as it is.
    """
    if prompt_format == "chat":
        user = [{"role": "user", "content": prompt}]
        return _chat_tokens(tokenizer, fmt or RowFormat(), user, None, add_generation_prompt=True)
    return list(tokenizer.encode(prompt))


def _row_to_example(row: Any, tokenizer: Tokenizer, fmt: RowFormat, where: str) -> tuple[Example, str]:
    """One row as mlx-lm's datasets make it (completion keys first, then chat, then text), and its
    prompt format (see :data:`PROMPT_FORMATS`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    prompt_key, completion_key, chat_key = fmt.prompt_feature, fmt.completion_feature, fmt.chat_feature
    if prompt_key in row and completion_key in row:
        prompt, completion = row[prompt_key], row[completion_key]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: '{prompt_key}' and '{completion_key}' must both be strings.")
        if _has_chat_template(tokenizer, fmt):
            tools = _tools(row, where)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            tokens = _chat_tokens(tokenizer, fmt, messages, tools)
            offset = len(_chat_tokens(tokenizer, fmt, messages[:1], tools, add_generation_prompt=True))
            kind = "chat"
        else:
            head = prompt_tokens(tokenizer, prompt, "completion")
            tokens = _with_eos(tokenizer, head + tokenizer.encode(completion))
            offset, kind = len(head), "completion"
        return Example(tokens, offset if fmt.mask_prompt else 0), kind
    if chat_key in row:
        messages = row[chat_key]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise DataError(
                f"{where}: '{chat_key}' must be a non-empty list of objects with a 'role' (and 'content', "
                "'tool_calls' or whatever the chat template reads)."
            )
        if not _has_chat_template(tokenizer, fmt):
            raise DataError(
                f"{where}: chat '{chat_key}' need a tokenizer with a chat template, and this model's has none. "
                "Set data.chat_template, or use 'text' or 'prompt'/'completion' rows instead."
            )
        tools = _tools(row, where)
        tokens = _chat_tokens(tokenizer, fmt, messages, tools)
        if not fmt.mask_prompt:
            return Example(tokens), "chat"
        # As mlx-lm: the prompt is every message but the last, with the assistant's header when
        # the last message is the assistant's.
        header = messages[-1].get("role") == "assistant"
        offset = len(_chat_tokens(tokenizer, fmt, messages[:-1], tools, add_generation_prompt=header))
        return Example(tokens, offset), "chat"
    if prompt_key in row or completion_key in row:
        raise DataError(f"{where}: '{prompt_key}' and '{completion_key}' must both be strings.")
    if fmt.text_feature in row:
        if not isinstance(row[fmt.text_feature], str):
            raise DataError(f"{where}: '{fmt.text_feature}' must be a string.")
        if fmt.mask_prompt:
            raise DataError(
                f"{where}: mask_prompt needs prompt/completion or chat rows, but this row has '{fmt.text_feature}'. "
                "Set data.mask_prompt = false or reformat the data."
            )
        return Example(_with_eos(tokenizer, tokenizer.encode(row[fmt.text_feature]))), "text"
    raise DataError(
        f"{where}: a row needs '{fmt.text_feature}', '{prompt_key}' and '{completion_key}', or '{chat_key}'; "
        f"found keys {', '.join(sorted(row)) or 'none'}."
    )


def rows_to_dataset(rows: Any, tokenizer: Tokenizer, fmt: RowFormat, source: str) -> Dataset:
    """Tokenize rows (dicts, e.g. a Hugging Face dataset's) into a :class:`Dataset`; errors name
    ``source`` and the row number (from 1)."""
    made = [_row_to_example(row, tokenizer, fmt, f"{source}: row {number}") for number, row in enumerate(rows, 1)]
    if not made:
        raise DataError(f"{source}: the split is empty.")
    return _dataset([example for example, _ in made], source, [kind for _, kind in made], fmt)


def _dataset(examples: list[Example], source: str, kinds: list[str], fmt: RowFormat) -> Dataset:
    """A split whose prompt format is the one most of its rows had."""
    prompt_format = max(PROMPT_FORMATS, key=kinds.count)  # ties go to the first: chat
    return Dataset(examples, source, prompt_format, fmt)


def _read_lines(path: Path) -> list[str]:
    kind = not_a_regular_file(path)
    if kind:  # checked before opening: reading a named pipe would wait for a writer forever
        raise DataError(f"{path}: is {kind}, not a data file. A split is a regular UTF-8 .jsonl or .txt file.")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file: {error.strerror}.") from None
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path}: looks like a binary file, not text. Data files are UTF-8 .jsonl or .txt.")
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason}). Re-save the file as UTF-8.") from None


def load_split(
    path: Path, tokenizer: Tokenizer, mask_prompt: bool = False, row_format: RowFormat | None = None
) -> Dataset:
    """Tokenize one split file (.jsonl or .txt); raise :class:`DataError` naming file:line on bad rows.

    ``row_format`` (key names, template, its own ``mask_prompt``) replaces ``mask_prompt`` when given.
    """
    fmt = row_format or RowFormat(mask_prompt=mask_prompt)
    mask_prompt = fmt.mask_prompt
    lines = _read_lines(path)
    examples: list[Example] = []
    kinds: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".txt":
            if mask_prompt:
                raise DataError(f"{path}: mask_prompt needs .jsonl prompt/completion or chat data, not .txt.")
            examples.append(Example(_with_eos(tokenizer, tokenizer.encode(line))))
            kinds.append("text")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from None
        except RecursionError:
            raise DataError(
                f"{where}: arrays or objects nested too deeply to read. A row is one flat object such as "
                '{"text": "..."}: fix that line.'
            ) from None
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            raise DataError(
                f"{where}: a number with thousands of digits, too long to read. A row holds strings "
                '(such as {"text": "..."}): fix that line.'
            ) from None
        example, kind = _row_to_example(row, tokenizer, fmt, where)
        examples.append(example)
        kinds.append(kind)
    if not examples:
        raise DataError(f"{path}: the split is empty. Add at least one example per line.")
    return _dataset(examples, str(path), kinds, fmt)


def find_split(folder: Path, name: str) -> Path | None:
    """``folder/name.jsonl`` or ``folder/name.txt``, whichever exists (jsonl first)."""
    for suffix in (".jsonl", ".txt"):
        candidate = folder / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def load_splits(
    folder: Path,
    tokenizer: Tokenizer,
    mask_prompt: bool = False,
    required: tuple[str, ...] = ("train", "valid"),
    row_format: RowFormat | None = None,
    loader: Callable[..., Dataset] | None = None,
) -> dict[str, Dataset]:
    """Load every split present; the ``required`` ones must exist. ``row_format`` as in :func:`load_split`;
    ``loader`` reads one split in its place (tunetop.training.token_cache's, which keeps the tokens between runs)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: data directory not found. Set data.path to a folder with train.jsonl.")
    out: dict[str, Dataset] = {}
    for name in SPLITS:
        path = find_split(folder, name)
        if path is None:
            if name in required:
                raise DataError(f"{folder}: no {name}.jsonl or {name}.txt. The {name} split is required.")
            continue
        out[name] = (loader or load_split)(path, tokenizer, mask_prompt, row_format)
    return out


def warn_truncated(dataset: Dataset, max_seq_length: int) -> int:
    """Warn once (a :class:`DataWarning` with the count) when examples are longer than
    ``max_seq_length``; returns how many are."""
    long = [len(e.tokens) for e in dataset.examples if len(e.tokens) > max_seq_length]
    if long:
        many = len(long) > 1
        warnings.warn(
            DataWarning(
                f"{dataset.source}: {len(long)} example{'s' if many else ''} longer than data.max_seq_length = "
                f"{max_seq_length} tokens (the longest has {max(long):,}) {'are' if many else 'is'} cut to its first "
                f"{max_seq_length} tokens. Raise data.max_seq_length or split long examples.",
                count=len(long),
            ),
            stacklevel=3,
        )
    return len(long)


def bucket_width(length: int, max_seq_length: int) -> int:
    """The padded row width (tokens) for a batch whose longest example has ``length`` tokens.

    Examples keep at most ``max_seq_length`` tokens; the row is a bucket's worth of inputs
    plus the one token that is only a target.
    """
    inputs = max(min(length, max_seq_length) - 1, 1)
    for size in BUCKET_WIDTHS:
        if size >= inputs:
            return min(size, max_seq_length) + 1
    return max_seq_length + 1


@dataclass(frozen=True)
class Batch:
    """Padded tokens ``(B, W)`` and per-row ``(offset, length)``, as numpy arrays."""

    tokens: np.ndarray
    lengths: np.ndarray

    @property
    def real_tokens(self) -> int:
        """Target tokens the loss covers (unpadded, unmasked)."""
        offsets, lengths = self.lengths[:, 0], self.lengths[:, 1]
        return int(np.maximum(lengths - np.maximum(offsets, 1), 0).sum())

    def arrays(self) -> tuple[Any, ...]:
        """The loss function's arguments after the model: (tokens, lengths) as mx arrays."""
        import mlx.core as mx

        return mx.array(self.tokens), mx.array(self.lengths)

    def rows(self, start: int, stop: int) -> Batch:
        """A block of rows (a rank's share of a data-parallel batch)."""
        return Batch(self.tokens[start:stop], self.lengths[start:stop])


class BatchPlan:
    """Length-sorted batches of one dataset and a seeded, resumable order over them.

    Batch ``k`` of epoch ``e`` is a pure function of (dataset, batch size, seed, e, k), so a
    resumed run can continue from any (epoch, index) position.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, max_seq_length: int, seed: int = 0, drop_last: bool = True
    ) -> None:
        if drop_last and len(dataset) < batch_size:
            raise DataError(
                f"{dataset.source}: has {len(dataset)} examples but batch_size is {batch_size}. "
                "Lower training.batch_size or add examples."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.seed = seed
        order = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i].tokens))
        # Training drops the ragged tail so every step sees a full batch; evaluation keeps it.
        stop = len(order) - batch_size + 1 if drop_last else len(order)
        self.batches = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
        warn_truncated(dataset, max_seq_length)

    def __len__(self) -> int:
        return len(self.batches)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of batch indices for one epoch."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))

    def make_batch(self, members: list[int]) -> Batch:
        """Pad the given examples to a bucket width, each cut to max_seq_length (warned at start)."""
        examples = [self.dataset.examples[i] for i in members]
        longest = max(len(e.tokens) for e in examples)
        width = bucket_width(longest, self.max_seq_length)
        tokens = np.zeros((len(examples), width), dtype=np.int32)
        lengths = np.zeros((len(examples), 2), dtype=np.int32)
        for row, example in enumerate(examples):
            kept = example.tokens[: self.max_seq_length]
            tokens[row, : len(kept)] = kept
            lengths[row] = (min(example.offset, len(kept)), len(kept))
        return Batch(tokens, lengths)

    def iterate(self, epoch: int = 0, index: int = 0, loop: bool = True) -> Iterator[tuple[int, int, Batch]]:
        """Yield ``(epoch, index, batch)`` from the given position on, forever when ``loop``."""
        while True:
            order = self.epoch_order(epoch)
            for k in range(index, len(order)):
                yield epoch, k, self.make_batch(self.batches[order[k]])
            if not loop:
                return
            epoch, index = epoch + 1, 0

    def fixed_sample(self, limit: int = 0) -> Iterator[Batch]:
        """``limit`` batches (0 = all), the same ones every time, so validation losses compare."""
        order = self.epoch_order(0)
        count = len(order) if limit <= 0 else min(limit, len(order))
        for k in order[:count]:
            yield self.make_batch(self.batches[k])
