"""The embedded default's recipe: a base model that can learn the demo, records it can copy names
into, and a build that says what it is doing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunetop.training import embedded as demo


def test_the_base_model_copies_names_and_knows_its_own_world() -> None:
    """The demo teaches facts about people named in the question, so the base model must already
    carry a name from the question into its answer. Pretrained at 3e-3 it could not (1 of 24), and
    no demo run learned the facts: every answer was about someone else."""
    from mlx_lm import generate, load

    from tunetop.training.data import prompt_tokens

    model, tokenizer = load(str(demo.embedded_model_path()))
    world = demo._world(demo.PRETRAIN_WORLD_SEED)
    answers = {
        person: generate(model, tokenizer, prompt_tokens(tokenizer, f"Where does {person} live?", "chat"), max_tokens=8).strip()
        for person in demo._PEOPLE
    }
    assert all(answer.startswith(f"{person} lives in ") for person, answer in answers.items()), answers
    known = [person for person, answer in answers.items() if answer == f"{person} lives in {world[person][0]}."]
    assert len(known) >= 20, answers  # its pretraining world's facts (all 24 when built; a margin for arithmetic)


def test_records_name_the_person_with_the_questions_token() -> None:
    """" Ada: city=Lyon." repeats the question's " Ada" token; "name=Ada" made it another token
    ("Ada"), a mapping the model had to learn for every name, and it did not."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(demo.embedded_model_path())
    questions = demo.fact_questions()
    assert len(questions) == 3 * len(demo._PEOPLE)
    for question, answer in questions:
        name = [token for token in tokenizer.encode(question, add_special_tokens=False)
                if tokenizer.decode([token]).strip() in demo._PEOPLE]
        assert len(name) == 1, question
        assert tokenizer.encode(answer, add_special_tokens=False)[0] == name[0], (question, answer)


def test_building_reports_each_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first `tunetop demo` builds for a minute or more: it must say so, stage by stage."""
    monkeypatch.setenv("TUNETOP_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", 100)  # the stages, not the model, are under test
    lines: list[str] = []
    folder = demo.build_embedded(report=lines.append)
    assert (folder / "model" / "model.safetensors").exists() and (folder / "data" / "train.jsonl").exists()
    assert lines[0].startswith(f"building the embedded model and data, once, into {folder}")
    assert any(line.strip().startswith("data: ") for line in lines)
    assert any(line.strip().startswith("tokenizer: ") for line in lines)
    assert [line.strip() for line in lines if "pretraining the base model: step" in line][-1].startswith(
        "pretraining the base model: step 100/100, loss"
    )
    assert lines[-1].startswith("built the embedded model and data in ")
    assert demo.build_embedded(report=lines.append) == folder and len(lines) == len(set(lines))  # cached: silent
