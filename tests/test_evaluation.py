"""`tunetop test`: a run's saved adapter scored on a split of its data, in a process of its own."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, tunetop, write_config
from tunetop.control.journal import read_events
from tunetop.runs.folders import list_runs
from tunetop.training.embedded import embedded_data_path


def scored(*args: str) -> dict:
    result = tunetop("test", *args, "--json", check=True)
    return json.loads(result.stdout)


def test_scores_the_saved_adapter_as_the_engine_validated_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 30, "steps_per_eval": 30, "validation_batches": 0},
        checkpoints={"save_every": 10},
    )
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    final = [e for e in read_events(run.journal) if e["type"] == "validation" and e["iteration"] == 30]

    # The whole validation split with the last adapter: what the engine computed at iteration 30.
    valid = scored(run.id, "--split", "valid")
    # Exactly equal by construction: the same weights (saved bit for bit), the same batches in
    # the same order (the same seed), the same evaluate().
    assert valid["iteration"] == 30 and valid["loss"] == final[0]["loss"]

    test = scored(run.id)
    assert test["split"] == "test" and test["examples"] == 120
    assert math.isfinite(test["loss"]) and test["perplexity"] == math.exp(test["loss"])  # the same double, through JSON's repr
    earlier = scored(run.id, "--checkpoint", "10")
    assert earlier["iteration"] == 10 and earlier["loss"] > test["loss"]  # training went on lowering it
    base = scored(run.id, "--base")
    assert base["adapter"] == "" and base["iteration"] is None and base["loss"] > earlier["loss"]
    assert "the base model, no adapter" in tunetop("test", run.id, "--base", "--batches", "1", check=True).stdout
    sentence = tunetop("test", run.id, check=True).stdout
    assert sentence.startswith(f"test loss {test['loss']:.4f}, perplexity ") and "iteration 30" in sentence

    missing = tunetop("test", run.id, "--checkpoint", "7")
    assert missing.returncode == 2 and "no checkpoint at iteration 7" in missing.stderr and "10, 20, 30" in missing.stderr


def test_a_missing_split_or_a_changed_lora_config_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):  # no test split
        shutil.copy(embedded_data_path() / f"{split}.jsonl", data / f"{split}.jsonl")
    config = write_config(tmp_path / "run.toml", data={"path": str(data)}, training={"iterations": 5}, checkpoints={"save_every": 5})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    result = tunetop("test", run.id)
    assert result.returncode == 2
    assert f"{data}: has no test split" in result.stderr and "it has train, valid" in result.stderr

    run.config.write_text(run.config.read_text().replace("rank = 4", "rank = 8"))
    result = tunetop("test", run.id, "--split", "valid")
    assert result.returncode == 2 and "do not fit the model" in result.stderr


def test_a_custom_adapter_path_is_where_test_and_export_look(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 5}, checkpoints={"save_every": 5, "adapter_path": "out"})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    assert run.adapters == run.path / "out" and (run.adapters / "adapters.safetensors").is_file()
    assert scored(run.id, "--split", "valid")["iteration"] == 5
    tunetop("export", run.id, "--format", "mlx", "--output", str(tmp_path / "exported"), check=True)
    assert (tmp_path / "exported" / "adapters.safetensors").read_bytes() == (run.adapters / "adapters.safetensors").read_bytes()


def test_a_terminal_sees_the_evaluation_progress_and_a_script_only_the_result(tmp_path: Path) -> None:
    # `tunetop test` on a large split showed nothing for minutes.
    config = write_config(tmp_path / "run.toml", training={"iterations": 4, "steps_per_report": 2, "steps_per_eval": 4},
                          checkpoints={"save_every": 4})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    command = [sys.executable, "-m", "tunetop.cli", "test", run.id, "--split", "valid"]
    terminal, its_end = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=its_end, cwd=str(ROOT), text=True)
    os.close(its_end)
    said = b""
    with contextlib.suppress(OSError):  # EIO: the process closed the terminal
        while chunk := os.read(terminal, 4096):
            said += chunk
    out, _ = process.communicate(timeout=240)
    os.close(terminal)
    assert process.returncode == 0, said
    assert re.search(rb"scoring the valid split: batch (\d+) of \1 \(100%\)", said), said
    assert out.startswith("valid loss ") and "batch" not in out  # stdout holds the result alone
    piped = tunetop("test", run.id, "--split", "valid", check=True)
    assert "batch" not in piped.stderr and piped.stdout == out  # not a terminal: no progress line
