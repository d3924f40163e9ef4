"""Metrics out: TensorBoard files carry the config and the hyper-parameters (read with TensorBoard's
own loader), and W&B and SwanLab runs, in their offline modes, are read back from their files."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from engine.config import ConfigError, RunConfig
from engine.journal import read_events
from engine.runs import list_runs
from engine.trackers import open_trackers
from tests.conftest import tunetop, write_config


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (.wandb): LevelDB log blocks of wandb_internal Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, out = 7, b"", []  # after the file header
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def key(item: Any) -> str:
    """A W&B item's key (newer versions write it as a one-element nested key)."""
    return str(item.key or "/".join(item.nested_key))


def swanlab_records(path: Path) -> list[Any]:
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader = DataStoreReader()
    reader.open(str(path))
    out = []
    for data in reader:
        record = record_pb2.Record()
        record.ParseFromString(data)
        out.append(record)
    reader.close()
    return out


def test_a_run_reports_to_tensorboard_wandb_and_swanlab(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = write_config(
        tmp_path / "run.toml",
        name="reported",
        training={"iterations": 4, "steps_per_report": 2, "steps_per_eval": 2},
        metrics={"tensorboard": True, "wandb": True, "swanlab": True, "project": "parity"},
    )
    home = tmp_path / "user"  # the trackers' own settings and caches stay in the test's folder
    env = {**os.environ, "HOME": str(home), "WANDB_MODE": "offline", "SWANLAB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache")}
    result = tunetop("train", str(config), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = list_runs()
    events = list(read_events(run.journal))
    assert not [e["message"] for e in events if e["type"] == "warning"]
    started = next(e for e in events if e["type"] == "run_started")
    train = {e["iteration"]: e for e in events if e["type"] == "train"}
    validation = {e["iteration"]: e for e in events if e["type"] == "validation"}
    assert sorted(train) == [2, 4] and sorted(validation) == [0, 2, 4]

    # TensorBoard: the config as text, and the hyper-parameters for the HParams tab.
    accumulator = EventAccumulator(str(run.path / "tensorboard"))
    accumulator.Reload()
    (text,) = accumulator.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert shown == "\n".join("    " + line for line in tomli_w.dumps(started["config"]).splitlines())
    content = accumulator.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lora.rank"].number_value == 4 and start.hparams["name"].string_value == "reported"
    assert start.hparams["optimizer.name"].string_value == "adam"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss", "validation/loss"}
    assert "_hparams_/session_end_info" in content

    # W&B, offline: the run (id, name, project, config) and every metric under mlx-lm's names.
    (log,) = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    (start_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (start_record.run_id, start_record.display_name, start_record.project) == (run.id, "reported", "parity")
    config_items = {key(item): json.loads(item.value_json) for item in start_record.config.update}
    assert config_items["lora"]["rank"] == 4 and config_items["name"] == "reported"
    history: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            row.update({key(item): json.loads(item.value_json) for item in record.history.item})
    for step, event in train.items():
        assert history[step]["train_loss"] == event["loss"] and history[step]["trained_tokens"] == event["trained_tokens"]
        assert history[step]["learning_rate"] == event["learning_rate"]
    for step, event in validation.items():
        assert history[step]["val_loss"] == event["loss"] and history[step]["val_time"] == event["seconds"]

    # SwanLab, offline: the experiment and its scalars.
    (swan,) = list((run.path / "swanlog").glob("run-*/run-*.swanlab"))
    kinds = [(r.WhichOneof("record_type"), getattr(r, r.WhichOneof("record_type"))) for r in swanlab_records(swan)]
    (begin,) = [body for kind, body in kinds if kind == "start"]
    assert (begin.project, begin.name) == ("parity", "reported")
    scalars = {(body.key, body.step): body.value.number for kind, body in kinds if kind == "scalar"}
    for step, event in train.items():
        assert scalars[("train_loss", step)] == event["loss"]
    for step, event in validation.items():
        assert scalars[("val_loss", step)] == event["loss"]
    assert any(kind == "finish" for kind, _body in kinds)
    assert "rank: 4" in (swan.parent / "files" / "config.yaml").read_text()


def test_a_missing_tracker_library_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = RunConfig(source="run.toml")
    cfg.metrics.wandb = True
    with pytest.raises(ConfigError, match=r"run.toml: metrics.wandb needs the wandb library: pip install 'tunetop\[wandb\]'"):
        open_trackers(cfg, "r", tmp_path, lambda _message: None)


def test_a_tracker_that_cannot_start_or_log_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.trackers import Tracker

    wandb = pytest.importorskip("wandb")

    def refuse(**_kwargs: Any) -> Any:
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = RunConfig()
    cfg.metrics.wandb = True
    warnings: list[str] = []
    assert open_trackers(cfg, "r", tmp_path, warnings.append) == []
    assert "Weights & Biases could not start (UsageError: api_key not configured" in warnings[0]
    assert "WANDB_MODE=offline" in warnings[0]

    class Broken:
        def log(self, *_args: Any, **_kwargs: Any) -> None:
            raise ConnectionError("gone")

    tracker = Tracker("wandb", Broken(), warnings.append)
    for iteration in (1, 2):
        tracker.on_event({"type": "train", "iteration": iteration, "loss": 1.0})
    assert len(warnings) == 2 and "stopped taking metrics (ConnectionError: gone)" in warnings[1]
