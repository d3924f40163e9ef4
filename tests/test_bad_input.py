"""Bad input meets a clear error: exit code 2, one paragraph naming the file, line or key and how
to fix it, and never a traceback (issue 17). Every case goes through the real command line.

The tables below are the cases; docs/RELIABILITY.md ("Bad input") lists them with their counts.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import tunetop, write_config
from tunetop.runs.folders import RunDir, list_runs, runs_root

HUGE = "9" * 5000  # past Python's 4300-digit limit for turning text into an int


def _clear(result: subprocess.CompletedProcess, code: int, *named: str) -> str:
    """Assert the exit code, no traceback, and that the output names each of ``named``."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for text in named:
        assert text in output, (text, output)
    return output


# -- the config file ---------------------------------------------------------------------------

CONFIG_TEXT: dict[str, tuple[str, tuple[str, ...]]] = {
    # case: (config text, what the message names besides the file)
    "5000-digit integer": (f"[training]\nseed = {HUGE}\n", (":2:", "thousands of digits")),
    "arrays 3000 deep": ("[lora]\nkeys = " + "[" * 3000 + "]" * 3000 + "\n", (":2:", "nested too deeply")),
    "memory_limit_gb = 1e300": ("[training]\nmemory_limit_gb = 1e300\n", (":2:", "training.memory_limit_gb")),
    "memory_limit_gb = 1e12": ("[training]\nmemory_limit_gb = 1e12\n", (":2:", "training.memory_limit_gb")),
    "a 30-digit integer": ("[training]\niterations = " + "1" * 30 + "\n", (":2:", "training.iterations")),
    "a huge integer for a float": ("[optimizer]\nlearning_rate = " + "1" * 400 + "\n", (":2:", "optimizer.learning_rate")),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TEXT))
def test_a_config_value_out_of_reach_is_a_clear_error(case: str, tmp_path: Path) -> None:
    text, named = CONFIG_TEXT[case]
    config = tmp_path / "run.toml"
    config.write_text(text)
    _clear(tunetop("train", str(config), timeout=120), 2, str(config), *named)
    assert list_runs() == []  # refused before a run folder was made


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make, kind", [(_fifo, "named pipe"), (_folder, "is a folder")], ids=["fifo", "folder"])
def test_a_config_path_that_is_no_file_is_refused_at_once(make: Callable[[Path], Path], kind: str, tmp_path: Path) -> None:
    config = make(tmp_path / "run.toml")
    # A FIFO used to be opened and waited on for a writer: the timeout turns a hang into a failure.
    _clear(tunetop("train", str(config), timeout=60), 2, str(config), kind)


# -- data and model settings found by the engine -------------------------------------------------

GOOD_ROW = '{"text": "Ada lives in Paris."}\n'


def _data(tmp_path: Path, train: Callable[[Path], None]) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "valid.jsonl").write_text(GOOD_ROW * 4)
    train(folder / "train.jsonl")
    return folder


DATA: dict[str, tuple[Callable[[Path], None], str]] = {
    # case: (how train.jsonl is made, what the message says after the file name)
    "a line nested 100,000 deep": (
        lambda p: p.write_text(GOOD_ROW + "[" * 100_000 + "]" * 100_000 + "\n" + GOOD_ROW * 3), ":2: arrays or objects nested too deeply"
    ),
    "a 5000-digit integer": (lambda p: p.write_text(GOOD_ROW + '{"text": ' + HUGE + "}\n" + GOOD_ROW * 3), ":2: a number with thousands of digits"),
    "train.jsonl is a folder": (lambda p: p.mkdir(), ": is a folder"),
    "train.jsonl is a FIFO": (lambda p: os.mkfifo(p), ": is a named pipe (FIFO)"),
}


@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_is_a_clear_error_naming_file_and_line(case: str, tmp_path: Path) -> None:
    make, said = DATA[case]
    data = _data(tmp_path, make)
    config = write_config(tmp_path / "run.toml", data={"path": str(data), "mask_prompt": False})
    # A FIFO used to hang the engine for good: the timeout turns that into a failure.
    _clear(tunetop("train", str(config), timeout=240), 2, f"{data / 'train.jsonl'}{said}")


def test_a_detached_run_with_bad_data_says_why_in_one_line(tmp_path: Path) -> None:
    data = _data(tmp_path, DATA["a 5000-digit integer"][0])
    config = write_config(tmp_path / "run.toml", data={"path": str(data), "mask_prompt": False})
    result = tunetop("train", str(config), "--detach", timeout=240)
    where = f"{data / 'train.jsonl'}:2: a number with thousands of digits"
    _clear(result, 2, "failed to start", where)
    (run,) = list_runs()
    log = run.log.read_text()
    assert where in log and "Traceback" not in log  # the detached engine's own output says it too
    assert run.summary()["state"] == "failed"


def test_lora_keys_that_name_no_module_are_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", lora={"keys": ["self_attn.nope"]})
    output = _clear(tunetop("train", str(config), timeout=240), 2, "'lora.keys'", "self_attn.q_proj")
    assert "[grad]" not in output  # mlx's own message for a model with nothing to train


def test_train_detach_says_so_when_the_engine_fails_at_start(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", lora={"keys": ["self_attn.nope"]})
    result = tunetop("train", str(config), "--detach", timeout=240)
    _clear(result, 2, "failed to start", "'lora.keys'")
    assert result.stdout.strip() == ""  # no run id printed as if it trained


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_an_engine_side_config_error_names_the_users_file_and_line(detach: bool, tmp_path: Path) -> None:
    # The optimizer's arguments are checked where MLX is (the engine): the message used to name
    # the run's copy (runs/ID/config.toml), whose lines are not the user's.
    config = write_config(tmp_path / "run.toml", optimizer={"learning_rate": 5e-4, "options": {"nosuch": 1}})
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("nosuch"))
    result = tunetop("train", str(config), *(["--detach"] if detach else []), timeout=240)
    output = _clear(result, 2, f"{config.resolve()}:{line}: optimizer.options.nosuch")
    assert "config.toml" not in output  # the run's copy is not named
    (run,) = list_runs()
    assert run.summary()["state"] == "failed"


# -- export, export-metrics and import-config ------------------------------------------------------


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short real run (saves at 2 and 4), trained once for the module; tests copy its folder."""
    home = tmp_path_factory.mktemp("trained")
    config = write_config(home / "run.toml", training={"iterations": 4, "steps_per_report": 2, "steps_per_eval": 4},
                          checkpoints={"save_every": 2})
    tunetop("train", str(config), check=True, env={**os.environ, "TUNETOP_HOME": str(home / "state")})
    (folder,) = (home / "state" / "runs").iterdir()
    return folder


@pytest.fixture
def trained_run(trained_once: Path) -> RunDir:
    target = runs_root() / trained_once.name
    shutil.copytree(trained_once, target)
    (target / "lock").unlink(missing_ok=True)
    return RunDir(target)


def test_export_onto_the_runs_own_adapters_is_refused_and_loses_nothing(trained_run: RunDir) -> None:
    latest = (trained_run.adapters / "adapters.safetensors").read_bytes()
    for extra in ([], ["--checkpoint", "2"]):  # a checkpoint's adapter would have replaced the latest one
        result = tunetop("export", trained_run.id, "--format", "mlx", "--output", str(trained_run.adapters), "--force", *extra)
        _clear(result, 2, str(trained_run.adapters), "own folder")
    result = tunetop("export", trained_run.id, "--format", "peft", "--output", str(trained_run.path), "--force")
    _clear(result, 2, "own folder")
    assert (trained_run.adapters / "adapters.safetensors").read_bytes() == latest


def test_export_onto_an_existing_file_is_refused(trained_run: RunDir, tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for fmt in ("mlx", "peft"):
        _clear(tunetop("export", trained_run.id, "--format", fmt, "--output", str(target), "--force"), 2, str(target), "is a file")
    assert target.read_text() == "keep me"


def test_export_metrics_onto_a_folder_names_the_file_to_give(trained_run: RunDir, tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    _clear(tunetop("export-metrics", trained_run.id, "--output", str(folder)), 2, f"{folder} is a folder", "metrics.csv")


IMPORTS: dict[str, tuple[str, str]] = {
    # case: (YAML text, the key the message names)
    "lora_parameters: 5": ("lora_parameters: 5\n", "'lora_parameters' must be a mapping"),
    "optimizer_config: [1]": ("optimizer_config: [1]\n", "'optimizer_config' must be a mapping"),
    "lr_schedule arguments: 5": ("lr_schedule:\n  name: cosine_decay\n  arguments: 5\n", "'lr_schedule'"),
    "a 5000-digit integer": (f"iters: {HUGE}\n", "a number too long"),
}


@pytest.mark.parametrize("case", sorted(IMPORTS))
def test_import_config_with_a_value_of_the_wrong_kind_names_the_key(case: str, tmp_path: Path) -> None:
    text, named = IMPORTS[case]
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(text)
    _clear(tunetop("import-config", str(recipe), "--output", str(tmp_path / "run.toml")), 2, str(recipe), named)
    assert not (tmp_path / "run.toml").exists()


def test_import_config_warns_that_trust_remote_code_was_carried_over(tmp_path: Path) -> None:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text("model: some-org/custom-model\ntrust_remote_code: true\n")
    result = _clear(tunetop("import-config", str(recipe), "--output", str(tmp_path / "run.toml")), 0)
    (warning,) = [line for line in result.splitlines() if "warning" in line]
    assert "trust_remote_code" in warning and "some-org/custom-model" in warning
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("model: some-org/custom-model\n")
    assert "warning" not in tunetop("import-config", str(quiet), "--output", str(tmp_path / "quiet.toml"), check=True).stdout


# -- the runs list and resuming --------------------------------------------------------------------


def test_ls_survives_a_status_file_that_is_not_utf8(trained_run: RunDir) -> None:
    trained_run.status_file.write_bytes(b"\xff\xfe{not json")
    result = _clear(tunetop("ls"), 0)
    assert trained_run.id in result


def test_resume_with_a_journal_of_bad_magic_says_what_to_do(trained_run: RunDir) -> None:
    # A damaged journal is repaired on open, with the seal beside it saying what it held
    # (tests/test_journal_corruption.py); a file with no journal in it at all (another file copied
    # over it) and no seal cannot be, and is refused.
    not_a_journal = b"XXXXXXXX" + b"these bytes hold no journal record\n" * 50
    trained_run.journal.write_bytes(not_a_journal)
    for hint in trained_run.path.glob("journal.ttj.*"):
        hint.unlink()
    for detach in ([], ["--detach"]):
        result = tunetop("train", "--resume", trained_run.id, *detach, timeout=240)
        _clear(result, 2, str(trained_run.journal), "bad magic", "checkpoints are untouched", "--resume")
    assert trained_run.journal.read_bytes() == not_a_journal  # left as it was, for the user to restore
    assert trained_run.summary()["state"] == "finished"  # the run's own state is not rewritten


def test_ls_hides_runs_that_failed_before_training_and_says_how_many(trained_run: RunDir, tmp_path: Path) -> None:
    for name in ("typo-one", "typo-two"):
        config = write_config(tmp_path / f"{name}.toml", name=name, data={"path": str(tmp_path / "no-such-folder-yet")})
        (tmp_path / "no-such-folder-yet").mkdir(exist_ok=True)  # exists, but holds no train.jsonl
        assert tunetop("train", str(config), timeout=240).returncode == 2
    failed = [run for run in list_runs() if run.id != trained_run.id]
    assert len(failed) == 2 and all(run.summary()["state"] == "failed" for run in failed)  # kept, and marked
    header, *rows = tunetop("ls", check=True).stdout.splitlines()
    assert "2 runs that failed before training hidden" in header and "--all" in header
    assert [row.split()[0] for row in rows] == [trained_run.id]
    header, *rows = tunetop("ls", "--all", check=True).stdout.splitlines()
    assert "hidden" not in header and len(rows) == 3
    assert all(row.split()[2:4] == ["failed", "-"] for row in rows if row.split()[0] != trained_run.id)
    listed = [json.loads(line) for line in tunetop("ls", "--json", "--all", check=True).stdout.splitlines()]
    assert sorted(row["trained"] for row in listed) == [False, False, True]
    # raw values for scripts, not the table's display strings
    (done,) = [row for row in listed if row["run"] == trained_run.id]
    assert isinstance(done["iteration"], int) and isinstance(done["iterations"], int) and done["iteration"] == done["iterations"]
    assert isinstance(done["loss"], float) and done["alive"] is False and isinstance(done["age_seconds"], float)
    assert datetime.datetime.fromisoformat(done["updated"]).tzinfo is not None
    assert all(row["iteration"] is None for row in listed if not row["trained"])
    assert "AGE: how long ago the run last reported" in " ".join(tunetop("ls", "--help", check=True).stdout.split())

