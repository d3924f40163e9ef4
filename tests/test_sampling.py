"""Samples from the live adapter: the `sample` command, scheduled prompts, and no effect on training."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.client_sync import send_command
from engine.journal import read_events
from engine.runs import RunDir, list_runs, resolve
from tests.conftest import tunetop, wait_for, write_config


def test_sampling_does_not_disturb_training(tmp_path: Path) -> None:
    training = {"iterations": 12, "steps_per_report": 1, "steps_per_eval": 6}
    plain = write_config(tmp_path / "plain.toml", training=training, lora={"dropout": 0.1})
    sampled = write_config(
        tmp_path / "sampled.toml",
        training=training,
        lora={"dropout": 0.1},
        sampling={"sample_prompts": ["Where does Ada live?", "Tell me about Bo."], "sample_every": 4, "temperature": 0.7},
    )
    tunetop("train", str(plain), check=True)
    tunetop("train", str(sampled), check=True)
    a, b = sorted(list_runs(), key=lambda r: r.status().get("name", ""))  # "plain", "sampled"
    losses = lambda run: [(e["iteration"], e["loss"]) for e in read_events(run.journal) if e["type"] in ("train", "validation")]  # noqa: E731
    assert losses(a) == losses(b)  # bit-identical, with dropout and temperature sampling in between
    samples = [e for e in read_events(b.journal) if e["type"] == "sample"]
    assert [s["iteration"] for s in samples] == [4, 4, 8, 8, 12, 12]
    assert all(isinstance(s["completion"], str) for s in samples)
    wa = mx.load(str(a.adapters / "adapters.safetensors"))
    wb = mx.load(str(b.adapters / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


def test_sample_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 2})
    run: RunDir = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        wait_for(lambda: send_command(run, "status").result["iteration"] >= 2)
        reply = send_command(run, "sample", {"prompt": "Where does Ada live?", "max_tokens": 8}, timeout=60)
        assert reply.ok and isinstance(reply.result["completion"], str) and reply.result["iteration"] >= 2
        bad = send_command(run, "sample", {"prompt": "", "max_tokens": 8})
        assert not bad.ok and "prompt" in bad.error
        bad = send_command(run, "sample", {"prompt": "x", "max_tokens": 0})
        assert not bad.ok and "max_tokens" in bad.error
        event = next(e for e in read_events(run.journal) if e["type"] == "sample")
        assert event["prompt"] == "Where does Ada live?" and event["completion"] == reply.result["completion"]
        cli = tunetop("sample", run.id, "--prompt", "Tell me about Bo.", "--max-tokens", "4", check=True)
        assert '"completion"' in cli.stdout
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)
