"""The embedded default: a small model and dataset tunetop builds offline, once, and caches.

Nothing can be downloaded on the machines this must run on, so ``tunetop demo`` and the tests
use a model of a real mlx-lm architecture (Llama) with seeded random weights, a byte-level BPE
tokenizer trained locally with the ``tokenizers`` library, both saved in the Hugging Face
layout and loaded back through mlx-lm's own loader, and a templated question-and-answer
dataset whose structure the model learns within a minute on two CPU cores, and every fact of
which it answers by the demo's end (bench/demo_facts.py measures it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BUILD_VERSION = 2
"""Bump when the model, tokenizer or data recipe changes: the cache key includes it."""

MODEL_SHAPE = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}
VOCAB_SIZE = 512
EMBEDDING_STD = 0.08  # small, as in HF's init, but large enough that a tied head can be confident

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_PEOPLE = [
    "Ada", "Bo", "Cyra", "Dev", "Eli", "Faye", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena",
    "Milo", "Nia", "Oto", "Pia", "Quin", "Rosa", "Sami", "Tova", "Uma", "Vik", "Wren", "Xia",
]
_CITIES = ["Lisbon", "Osaka", "Quito", "Tromso", "Accra", "Perth", "Lyon", "Hanoi"]
_COLOURS = ["red", "green", "blue", "amber", "violet", "teal"]
_PETS = ["cat", "dog", "owl", "fox", "hare", "newt"]


def cache_root() -> Path:
    """Where built artefacts live: $TUNETOP_CACHE, else $XDG_CACHE_HOME/tunetop, else ~/.cache/tunetop."""
    if env := os.environ.get("TUNETOP_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunetop"


def embedded_dir() -> Path:
    """The folder holding ``model/`` and ``data/`` of the embedded default (may not exist yet)."""
    return cache_root() / f"embedded-v{BUILD_VERSION}"


def _world(seed: int) -> dict[str, tuple[str, str, str]]:
    rng = random.Random(seed)
    return {p: (rng.choice(_CITIES), rng.choice(_COLOURS), rng.choice(_PETS)) for p in _PEOPLE}


def _prose(person: str, facts: tuple[str, str, str], kind: int, rng: random.Random) -> tuple[str, str]:
    city, colour, pet = facts
    if kind == 0:
        return f"Where does {person} live?", f" {person} lives in {city}."
    if kind == 1:
        return f"What colour does {person} like?", f" {person} likes {colour}."
    if kind == 2:
        return f"Which pet does {person} keep?", f" {person} keeps a {pet}."
    completion = f" {person} lives in {city}, likes {colour} and keeps a {pet}."
    if rng.random() < 0.5:  # a tail of varied length, as real data has
        completion += f" On weekends {person} walks the {pet} around {city}." * rng.randint(1, 4)
    return f"Tell me about {person}.", completion


def _record(people: list[str], world: dict[str, tuple[str, str, str]], kind: int) -> tuple[str, str]:
    # The name leads each record after a space, as in the question: the same token (" Ada"), which
    # the base model learned to copy. Written "name=Ada" it is another token ("Ada"), and even on
    # a base model that copies names the demo answered about other people (0 of 72 facts, now 72).
    person = people[0]
    city, colour, pet = world[person]
    if kind == 0:
        return f"Where does {person} live?", f" {person}: city={city}."
    if kind == 1:
        return f"What colour does {person} like?", f" {person}: colour={colour}."
    if kind == 2:
        return f"Which pet does {person} keep?", f" {person}: pet={pet}."
    records = " ".join(f"{p}: city={world[p][0]}; colour={world[p][1]}; pet={world[p][2]}." for p in people)
    return f"Tell me about {', '.join(people)}.", " " + records


def fact_questions() -> list[tuple[str, str]]:
    """Every single-fact question of the demo world with the answer its data gives (72 pairs):
    what the demo should answer by its end."""
    world = _world(0)
    return [_record([person], world, kind) for person in _PEOPLE for kind in range(3)]


def make_examples(count: int, seed: int, world_seed: int = 0, style: str = "record") -> list[dict[str, str]]:
    """Prompt/completion pairs about a small world of people, their city, colour and pet.

    ``prose`` answers in sentences (the base model's pretraining); ``record`` answers in a
    terse ``Name: key=value`` format the base model has never seen (the fine-tuning task): the
    format is learned within a few dozen steps, the facts of the demo world over the next few
    hundred.
    """
    world = _world(world_seed)
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for _ in range(count):
        kind = rng.randrange(4)
        if style == "prose":
            person = rng.choice(_PEOPLE)
            prompt, completion = _prose(person, world[person], kind, rng)
        else:
            people = rng.sample(_PEOPLE, rng.randint(1, 4) if kind == 3 else 1)
            prompt, completion = _record(people, world, kind)
        out.append({"prompt": prompt, "completion": completion})
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def pretraining_rows() -> list[dict[str, str]]:
    """The base model's pretraining text: prose about a different world."""
    return make_examples(3000, seed=11, world_seed=PRETRAIN_WORLD_SEED, style="prose")


def _build_data(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    splits = {"train": make_examples(1200, 1), "valid": make_examples(120, 2), "test": make_examples(120, 3)}
    for name, rows in splits.items():
        _write_jsonl(folder / f"{name}.jsonl", rows)
    every = [row for rows in splits.values() for row in rows] + pretraining_rows()
    return [r["prompt"] + r["completion"] for r in every]


def _build_tokenizer(folder: Path, corpus: list[str]) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2)
    )
    return tokenizer.get_vocab_size()


PRETRAIN_STEPS = 300
PRETRAIN_LEARNING_RATE = 1e-3
"""At 3e-3 the base model never learned to copy a name from the question (1 of 24 answers
began with the asked-about name after 2,000 steps); at 1e-3 all 24, and its world's facts, by
step 250."""
PRETRAIN_WORLD_SEED = 7
"""The base model is pretrained on the same kind of text about a *different* world, so it knows
the language and the template but holds other facts: fine-tuning then has something real to
learn (the demo world's facts), and its loss falls visibly within a minute."""


def _pretrain(model: object, tokenizer_file: Path, report: Callable[[str], None]) -> None:
    import mlx.optimizers as optim
    from tokenizers import Tokenizer

    from tunetop.training.data import Dataset, Example
    from tunetop.training.trainer import Trainer, TrainingParameters

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    rows = pretraining_rows()
    texts = [f"<|user|>{r['prompt']}</s><|assistant|>{r['completion']}</s>" for r in rows]
    examples = [Example(tokenizer.encode(t).ids) for t in texts]
    parameters = TrainingParameters(batch_size=16, iterations=PRETRAIN_STEPS, seed=5)
    rate = PRETRAIN_LEARNING_RATE
    trainer = Trainer(model, optim.Adam(learning_rate=rate), Dataset(examples, "pretraining corpus"), None,  # type: ignore[arg-type]
                      parameters, schedule=lambda step: rate * min(1.0, (step + 1) / 50))
    for step in range(1, PRETRAIN_STEPS + 1):
        loss = trainer.step().loss
        if step % 50 == 0:
            report(f"  pretraining the base model: step {step}/{PRETRAIN_STEPS}, loss {loss:.3f}")


def _build_model(folder: Path, vocab_size: int, eos_id: int, bos_id: int, report: Callable[[str], None]) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = dict(MODEL_SHAPE, vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=bos_id)
    mx.random.seed(1234)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    embed = model.model.embed_tokens
    embed.weight = mx.random.normal(embed.weight.shape) * EMBEDDING_STD
    _pretrain(model, folder / "tokenizer.json", report)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_embedded(force: bool = False, report: Callable[[str], None] | None = None) -> Path:
    """Build the embedded model and data if not cached; return the folder with ``model/`` and ``data/``.

    ``report`` receives a line per stage (and pretraining progress) while it builds, about a
    minute on two cores. Built into a temporary sibling and renamed into place, so a crash
    mid-build or two builds racing never leave a half-written cache behind.
    """
    target = embedded_dir()
    if target.exists() and not force:
        return target
    say = report or (lambda _line: None)
    started = time.monotonic()
    say(f"building the embedded model and data, once, into {target} (about a minute on two cores)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        corpus = _build_data(staging / "data")
        model_dir = staging / "model"
        model_dir.mkdir()
        say(f"  data: {len(corpus)} rows; training the tokenizer")
        vocab_size = _build_tokenizer(model_dir, corpus)
        vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        say(f"  tokenizer: {vocab_size} tokens; pretraining the base model ({PRETRAIN_STEPS} steps)")
        _build_model(model_dir, vocab_size, eos_id=vocab["</s>"], bos_id=vocab["<s>"], report=say)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():  # lost a race with another builder: theirs is as good as ours
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    say(f"built the embedded model and data in {time.monotonic() - started:.0f} s")
    return target


def embedded_model_path(report: Callable[[str], None] | None = None) -> Path:
    """The embedded model's Hugging Face-layout folder, built on first use (``report``: its progress)."""
    return build_embedded(report=report) / "model"


def embedded_data_path() -> Path:
    """The embedded dataset's folder (train/valid/test.jsonl), built on first use."""
    return build_embedded() / "data"
