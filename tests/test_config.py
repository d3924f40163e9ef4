"""Run config validation: every mistake names the file, line and key and says how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunetop.training import config
from tunetop.training.config import ConfigError


def test_starter_config_validates_and_trains_the_embedded_default() -> None:
    cfg = config.parse(config.starter_text(), "starter.toml")
    assert cfg.model.path == config.EMBEDDED
    assert cfg.data.path == config.EMBEDDED
    assert cfg.training.iterations == 300


def test_defaults_follow_lora_train_parameters() -> None:
    cfg = config.parse("")
    t = cfg.training
    assert (t.batch_size, t.iterations, t.steps_per_report, t.steps_per_eval, t.validation_batches) == (4, 1000, 10, 100, 10)
    assert cfg.checkpoints.save_every == 100
    assert (cfg.lora.num_layers, cfg.lora.rank, cfg.lora.scale, cfg.lora.fine_tune_type) == (16, 8, 10.0, "lora")
    assert cfg.data.max_seq_length == 2048


def test_unknown_key_is_named_with_line_and_suggestion() -> None:
    text = "[training]\nbatch_size = 2\nlearnig_rate = 1\n"
    with pytest.raises(ConfigError) as info:
        config.parse(text, "run.toml")
    message = str(info.value)
    assert "run.toml:3" in message
    assert "training.learnig_rate" in message
    # learning_rate lives in [optimizer]; within [training] the closest is reported, and the list is given
    assert "Valid keys in [training]" in message


def test_unknown_key_suggests_closest_in_section() -> None:
    with pytest.raises(ConfigError, match=r"Did you mean 'batch_size'\?"):
        config.parse("[training]\nbatch_sise = 2\n", "run.toml")


def test_unknown_table_is_suggested() -> None:
    with pytest.raises(ConfigError, match=r"run.toml:1: unknown table or key 'trainig'. Did you mean 'training'\?"):
        config.parse("[trainig]\nbatch_size = 2\n", "run.toml")


def test_wrong_type_names_key_expected_and_got() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse('[training]\n\nbatch_size = "four"\n', "run.toml")
    message = str(info.value)
    assert "run.toml:3" in message and "training.batch_size" in message
    assert "an integer" in message and "'four'" in message


def test_bool_is_not_an_integer() -> None:
    with pytest.raises(ConfigError, match="must be an integer"):
        config.parse("[training]\niterations = true\n")


def test_range_is_checked() -> None:
    with pytest.raises(ConfigError, match="'lora.rank' must be at least 1, got 0"):
        config.parse("[lora]\nrank = 0\n")
    with pytest.raises(ConfigError, match="'lora.dropout' must be between"):
        config.parse("[lora]\ndropout = 2.5\n")


def test_choice_is_checked_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"one of adam, adamw, sgd, adafactor, muon, got 'adamm'. Did you mean 'adam'\?"):
        config.parse('[optimizer]\nname = "adamm"\n')


def test_integers_are_accepted_for_floats() -> None:
    cfg = config.parse("[optimizer]\nlearning_rate = 1\n")
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)


def test_invalid_toml_names_the_file() -> None:
    with pytest.raises(ConfigError, match="run.toml: not valid TOML"):
        config.parse("[training\n", "run.toml")


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file. Create one with `tunetop init"):
        config.load(tmp_path / "missing.toml")


def test_missing_data_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[data]\npath = "nowhere"\n')
    cfg = config.load(path)
    with pytest.raises(ConfigError, match="'data.path' = 'nowhere' is not a directory"):
        config.check_paths(cfg)


def test_relative_data_path_resolves_against_the_config(tmp_path: Path) -> None:
    (tmp_path / "mydata").mkdir()
    path = tmp_path / "run.toml"
    path.write_text('[data]\npath = "mydata"\n')
    assert config.load(path).data.path == str(tmp_path / "mydata")


def test_round_trip_through_tomli_w() -> None:
    cfg = config.parse('name = "x"\n[lora]\nkeys = ["self_attn.q_proj"]\n[schedule]\nname = "cosine"\nwarmup = 5\n')
    again = config.parse(config.dumps(cfg))
    assert again == cfg


def test_live_fields_are_coerced_and_others_refused() -> None:
    assert config.coerce_live("learning_rate", "1e-4") == 1e-4  # parsed as Python parses the literal: the same double
    assert config.coerce_live("steps_per_eval", 50) == 50
    with pytest.raises(ConfigError, match="must be at least 1"):
        config.coerce_live("save_every", "0")
    with pytest.raises(ConfigError, match="cannot be changed while a run trains.*Live-editable fields"):
        config.coerce_live("batch_size", "8")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # 1e300 and 1e12 GB passed, then MLX raised OverflowError / TypeError with the value stored.
        ("memory_limit_gb", 1e300, r"'training.memory_limit_gb' must be between 0.0 and 1000000.0, got 1e\+300\. "
         "memory_limit_gb takes a number: Soft cap"),
        ("memory_limit_gb", 1e12, "must be between 0.0 and 1000000.0, got 1000000000000.0"),
        ("memory_limit_gb", "1e12", "must be between 0.0 and 1000000.0"),
        ("memory_limit_gb", "1" * 5000, "a value of 5000 characters is not a value for it"),
        ("memory_limit_gb", "[" * 90, "is not a value"),
        ("learning_rate", {"x": "y" * 10_000}, "must be a finite number, got dict"),
        ("steps_per_eval", [1], "must be an integer, got a list"),
        ("learning_rate", "2e-4\nsave_every = 1", "holds more than one value"),
    ],
)
def test_live_values_are_refused_with_a_sentence(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config.coerce_live(key, value)
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("../../../x", "climbs out of the run folder"),
        ("adapters/../../x", "climbs out of the run folder"),
        ("/tmp/elsewhere", "is an absolute path"),
        ("~/adapters", "starts with '~'"),
        ("", "is empty"),
        ("checkpoints/mine", "checkpoint retention prunes"),
        (".", "is the run folder itself"),
        ("journal.ttj", "one of the run's own files"),
        ("config.toml/x", "one of the run's own files"),
        ("rank1.log", "one of the run's own files"),
    ],
)
def test_adapter_path_must_stay_inside_the_run_folder(value: str, why: str) -> None:
    text = f'[checkpoints]\nsave_every = 5\nadapter_path = "{value}"\n'
    with pytest.raises(ConfigError, match=r"run.toml:3: 'checkpoints.adapter_path' = .*" + why) as raised:
        config.parse(text, "run.toml")
    assert "tunetop export" in str(raised.value)


def test_adapter_paths_inside_the_run_folder_are_fine() -> None:
    for value in ("adapters", "out", "out/lora", "./adapters", "my..adapters", "ranked"):
        assert config.parse(f'[checkpoints]\nadapter_path = "{value}"\n').checkpoints.adapter_path == value


def test_train_refuses_an_escaping_adapter_path_and_writes_nothing_outside(tmp_path: Path) -> None:
    from tests.conftest import tunetop, write_config
    from tunetop.runs.folders import RunDir

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapters.safetensors").write_bytes(b"someone else's file")
    for value in ("../../../outside", str(outside)):
        path = write_config(tmp_path / "run.toml", checkpoints={"save_every": 1, "keep_last": 1, "adapter_path": value})
        result = tunetop("train", str(path))
        assert result.returncode == 2, result.stderr
        assert "'checkpoints.adapter_path'" in result.stderr and "Traceback" not in result.stderr
        assert sorted(p.name for p in outside.iterdir()) == ["adapters.safetensors"]
        assert (outside / "adapters.safetensors").read_bytes() == b"someone else's file"
    # A run folder whose config escapes (written by an older version) reads its adapters inside.
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text(f'[checkpoints]\nadapter_path = "{outside}"\n')
    assert run.adapters == run.path / "adapters"


def test_place_error_names_the_file_and_the_line_of_the_key_it_mentions(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\nname = "adam"\noptions = { nosuch = 1 }\n\n[lora]\nrank = 8\n')
    assert config.place_error(f"{path}: optimizer.options.nosuch is wrong", str(path)) == f"{path}:3: optimizer.options.nosuch is wrong"
    assert config.place_error("a step needs 9 GB. Lower training.batch_size or lora.rank", str(path)) == (
        f"{path}:6: a step needs 9 GB. Lower training.batch_size or lora.rank"  # the first key the file sets
    )
    assert config.place_error(f"model.path in {path} is gone", str(path)) == f"model.path in {path} is gone"
    path.write_text("[optimizer.options]\nnosuch = 1\n")
    assert config.place_error(f"{path}: optimizer.options.nosuch is wrong", str(path)).startswith(f"{path}:2: ")
    assert config.place_error("plain", "") == "plain"


def test_a_learning_rate_has_an_upper_bound_in_the_file_and_live() -> None:
    # `tunetop set RUN learning_rate=1e9` was accepted: one rule (coerce_field) for both sides now.
    with pytest.raises(ConfigError, match=r"run.toml:2: 'optimizer.learning_rate' must be between 0.0 and 10.0, got 1000000000.0"):
        config.parse("[optimizer]\nlearning_rate = 1e9\n", source="run.toml")
    with pytest.raises(ConfigError, match=r"'optimizer.learning_rate' must be between 0.0 and 10.0.*about 1e-6 to 1e-2"):
        config.coerce_live("learning_rate", "1e9")
    with pytest.raises(ConfigError, match="'schedule.warmup_init' must be between"):
        config.parse("[schedule]\nwarmup = 5\nwarmup_init = 100.0\n")
    assert config.coerce_live("learning_rate", 10) == 10.0
    assert config.parse("[optimizer]\nlearning_rate = 0.5\n").optimizer.learning_rate == 0.5
