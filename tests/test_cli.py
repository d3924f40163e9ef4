"""The command line as a user meets it: exit codes, messages without tracebacks, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, tunetop, write_config
from tunetop.control.journal import read_events
from tunetop.runs.folders import list_runs


def test_bad_config_exits_2_with_the_key_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[training]\nbatch_size = 4\nitterations = 10\n")
    result = tunetop("train", str(config))
    assert result.returncode == 2
    assert f"{config}:3" in result.stderr and "Did you mean 'iterations'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert list_runs() == []  # nothing was started


def test_missing_config_exits_2(tmp_path: Path) -> None:
    result = tunetop("train", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "tunetop init" in result.stderr


def test_bad_data_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (data / "valid.jsonl").write_text('{"text": "fine"}\n')
    config = write_config(tmp_path / "run.toml", data={"path": str(data), "mask_prompt": False})
    result = tunetop("train", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{data / 'train.jsonl'}:2: invalid JSON" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_model_id_that_is_not_cached_and_not_reachable_names_the_id(tmp_path: Path) -> None:
    """This machine cannot reach the Hub (like a laptop on a plane): the error says so, naming the id.

    HF_HUB_OFFLINE makes the result the same on a machine that can reach it.
    """
    config = write_config(tmp_path / "run.toml", model={"path": "tunetop-tests/not-a-real-model"})
    result = tunetop("train", str(config), env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "model 'tunetop-tests/not-a-real-model'" in output
    assert "is not in the Hugging Face cache and the Hub cannot be reached" in output
    assert "Traceback" not in output


def test_model_errors_explain_what_to_do() -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    from tunetop.training.hub import explain

    # The Hub's own exception type (built without an HTTP response, which only its __init__ reads).
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404 Client Error: Repository Not Found")
    assert "not found on the Hugging Face Hub" in explain("owner/typo", "model.path in run.toml", missing)
    assert "neither a local folder nor a Hugging Face id" in explain("llama", "k", OSError("nope"))
    assert "a folder with config.json" in explain("/tmp", "k", FileNotFoundError("config.json"))


def test_init_then_train_headless(tmp_path: Path) -> None:
    config = tmp_path / "starter.toml"
    assert tunetop("init", str(config)).returncode == 0
    assert tunetop("init", str(config)).returncode == 2  # refuses to overwrite
    text = config.read_text().replace("iterations = 300", "iterations = 12").replace("steps_per_report = 10", "steps_per_report = 4")
    config.write_text(text)
    result = tunetop("train", str(config), check=True)
    assert "Iter 4: train loss" in result.stdout and "Iter 12: val loss" in result.stdout
    (run,) = list_runs()
    assert (run.adapters / "adapters.safetensors").exists()
    assert json.loads((run.adapters / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 8
    assert run.status()["state"] == "finished"
    ls = tunetop("ls", check=True).stdout.splitlines()
    assert ls[0].split()[:3] == ["RUN", "NAME", "STATE"] and ls[1].startswith(run.id)
    events = [json.loads(line) for line in tunetop("events", check=True).stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "finished"


def test_ls_shows_the_iteration_a_run_ended_at_between_reports(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 7, "steps_per_report": 5, "steps_per_eval": 100})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()
    assert run.summary()["iter"] == "7/7"  # the last report was at 5
    assert "7/7" in tunetop("ls", check=True).stdout.splitlines()[1].split()


def test_ctrl_c_saves_the_adapter_and_exits_130(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 1})
    process = subprocess.Popen(
        [sys.executable, "-m", "tunetop.cli", "train", str(config)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("Iter 3:"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    (run,) = list_runs()
    assert (run.adapters / "adapters.safetensors").exists()
    events = list(read_events(run.journal))
    assert events[-1]["type"] == "finished" and events[-1]["reason"] == "interrupted"
    assert any(e["type"] == "save" for e in events)
    assert "Traceback" not in err


def test_detached_run_survives_and_reports(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 30})
    result = tunetop("train", str(config), "--detach", check=True)
    run_id = result.stdout.strip()
    (run,) = list_runs()
    assert run.id == run_id
    deadline = time.monotonic() + 300  # 30 steps: a minute or more on a busy machine
    while run.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.status()["state"] == "finished"
    assert tunetop("pause", run_id).returncode == 3  # no live engine any more
    status = tunetop("status", run_id)  # ... but a finished run still says where it ended
    assert status.returncode == 0 and "finished (completed) at iteration 30 of 30" in status.stdout
    assert json.loads(tunetop("status", run_id, "--json", check=True).stdout)["live"] is False
    assert os.path.getsize(run.log) > 0


def test_console_output_respects_no_color_and_non_terminals(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io

    from tunetop.runs.console import ConsoleReporter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    warning = {"type": "warning", "message": "careful", "seq": 1, "ts": 0.0}
    train = {"type": "train", "iteration": 1, "loss": 1.0, "learning_rate": 1e-4, "iterations_per_second": 1.0,
             "tokens_per_second": 1.0, "trained_tokens": 1, "peak_memory": 0.1, "seq": 2, "ts": 0.0}

    def output(stream: io.StringIO) -> str:
        reporter = ConsoleReporter(10, stream)
        reporter(warning)
        reporter(train)
        reporter.close()
        return stream.getvalue()

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[33m" in output(Terminal())  # colour and a progress bar on a terminal
    piped = output(io.StringIO())
    assert "\x1b" not in piped and "careful" in piped  # plain lines into a pipe or a file
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[33m" not in output(Terminal())


def test_help_lists_what_each_command_does_and_hides_the_internal_ones() -> None:
    text = tunetop("--help", check=True).stdout
    for internal in ("_engine", "_follower", "_remote-info", "SUPPRESS"):
        assert internal not in text
    assert "a running run" not in text  # "status a running run" said nothing
    assert "run a validation pass on a live run" in text
    wrong = tunetop("evaluat")
    assert wrong.returncode == 2 and "Did you mean 'evaluate'?" in wrong.stderr and "_engine" not in wrong.stderr
    assert tunetop("_engine", "--help").returncode == 0  # hidden, still there for the engine's own start


def test_replies_read_as_sentences(engine_run) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import wait_for
    from tunetop.runs.client_sync import send_command

    wait_for(lambda: int(send_command(engine_run, "status").result["iteration"]) >= 2)
    result = tunetop("evaluate", engine_run.id, check=True)
    line = result.stdout.strip()
    assert line.startswith("evaluate: ok — iteration ") and ", validation loss " in line
    loss = line.rsplit(" ", 1)[1]
    assert len(loss.replace(".", "").lstrip("0")) <= 4  # four significant digits, not a float's repr
    data = json.loads(tunetop("status", engine_run.id, "--json", check=True).stdout)
    assert data["ok"] and data["state"] == "running"
    refused = tunetop("set", engine_run.id, "learning_rate=1e9")  # the config's bound, live too
    assert refused.returncode == 3 and "'optimizer.learning_rate' must be between 0.0 and 10.0" in refused.stdout + refused.stderr
    assert tunetop("pause", engine_run.id, check=True).stdout.startswith("pause: ok — paused at iteration ")


def test_a_run_name_or_prefix_that_matches_several_runs_is_refused_with_the_candidates(isolated_state: Path) -> None:
    from tunetop.runs.folders import RunDir, resolve

    def made(run_id: str, **status: object) -> RunDir:
        run = RunDir(isolated_state / "runs" / run_id)
        run.path.mkdir(parents=True)
        run.write_status(status)
        return run

    made("20261129-100000-aaaa", name="exp", state="finished", iteration=40, iterations=40)
    made("20261129-100100-bbbb", name="exp", state="failed", iteration=12, iterations=40)
    early = made("20261129-100200-cccc", name="solo", state="failed", reason="bad_input")
    solo = made("20261129-100300-dddd", name="solo", state="finished", iteration=40, iterations=40)
    for spec, count in (("exp", 2), ("20261129-100", 3)):
        result = tunetop("status", spec, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"'{spec}' matches {count} runs; give one's id" in result.stderr
        assert "20261129-100000-aaaa  exp  finished" in result.stderr
        assert "20261129-100100-bbbb  exp  failed" in result.stderr
    # a run that failed before training (hidden by `ls`) leaves the name meaning the one that trained
    assert resolve("solo") == solo and resolve(early.id) == early


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    """`tunetop ls | head`: the pipe closes before ls has written everything; that ends the
    command quietly (exit 0), not with a BrokenPipeError traceback."""
    from tests.recorded import recorded_events, write_recorded_run

    home = Path(os.environ["TUNETOP_HOME"])
    for number in range(300):
        run_id = f"20260101-{number:06d}-abcd"
        write_recorded_run(home, recorded_events(iterations=20, run_id=run_id), run_id=run_id)
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first write
    result = subprocess.run([sys.executable, "-m", "tunetop.cli", "ls"], stdout=writer, stderr=subprocess.PIPE,
                            text=True, timeout=120, cwd=str(ROOT))
    os.close(writer)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 0


def test_an_unreadable_queue_file_is_named_not_a_traceback() -> None:
    """`tunetop queue` on a queue.json cut short (a hand edit, a full disk): exit 2 with the
    sentence that names the file, as `queue add` gives (it was a QueueError traceback, exit 1)."""
    folder = Path(os.environ["TUNETOP_HOME"]) / "queue"
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder.parent, 0o700)
    (folder / "queue.json").write_text('{"version": 1, "entries": [{"id": 1, "na')
    result = tunetop("queue")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert str(folder / "queue.json") in result.stderr
