"""The machine (issue 20, part 4): `system` events from a real engine, their digest, the panel."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import tunetop, wait_for, write_config
from tests.recorded import RUN_ID, T0, recorded_events, write_recorded_run
from tunetop.control.events import EventLog
from tunetop.control.history import History
from tunetop.control.journal import JournalWriter, read_events
from tunetop.control.protocol import loads, make_event
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir, list_runs, resolve
from tunetop.runs.machine import Nvml, SystemMonitor
from tunetop.training import config as config_module
from tunetop.training.config import ConfigError
from tunetop.tui.app import TunetopApp
from tunetop.tui.screens.dashboard import DashboardScreen
from tunetop.tui.state import RunState
from tunetop.tui.widgets.panels import SystemPanel, spark

GPU_FIELDS = {"gpu_utilization", "gpu_memory_used", "gpu_memory_total", "gpu_power"}


@pytest.fixture
def sampled_run(tmp_path: Path) -> Iterator[RunDir]:
    """A detached engine on the embedded model sampling the machine every second; killed afterwards."""
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 100_000, "steps_per_report": 2, "steps_per_eval": 10_000},
        checkpoints={"save_every": 10_000},
        metrics={"system_seconds": 1},
    )
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    yield run
    pid = run.engine_pid()
    if run.is_alive() and pid:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=10)


def system_events(run: RunDir) -> list[dict[str, Any]]:
    return [e for e in read_events(run.journal) if e["type"] == "system"]


def test_a_training_engine_journals_plausible_system_events_also_while_paused(sampled_run: RunDir) -> None:
    wait_for(lambda: len(system_events(sampled_run)) >= 3, timeout=120)
    assert send_command(sampled_run, "pause").ok
    paused_at = len(system_events(sampled_run))
    wait_for(lambda: len(system_events(sampled_run)) >= paused_at + 2, timeout=60)  # paused, still watched
    assert send_command(sampled_run, "stop").ok
    wait_for(lambda: not sampled_run.is_alive(), timeout=60)
    events = system_events(sampled_run)
    for event in events:
        assert event["rss"] > 10 * 2**20  # a Python process with MLX and a model loaded
        assert 0 < event["memory_used"] <= event["memory_total"]
        assert event["rss"] < event["memory_total"]
        assert event["cpu_percent"] >= 0
        assert 0 < event["mlx_active"] <= event["mlx_peak"]  # the model's weights are MLX arrays
        assert event["mlx_cache"] >= 0
        assert not GPU_FIELDS & event.keys()  # no NVIDIA GPU (nor nvidia-ml-py) here: left out, not zero
    assert {e["memory_total"] for e in events} == {events[0]["memory_total"]}
    # Sampled every second, not every step: over the seconds between the first and the last,
    # about one a second (a busy machine delays a step, and a sample waits for the step's end).
    span = events[-1]["ts"] - events[0]["ts"]
    assert len(events) - 1 <= span + 2
    assert any(e["cpu_percent"] > 1 for e in events)  # training burns CPU here (MLX on the CPU backend)


def test_system_seconds_zero_turns_sampling_off(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 20}, metrics={"system_seconds": 0})
    tunetop("train", str(config), check=True)
    (run,) = list_runs()  # this test's own runs folder
    events = list(read_events(run.journal))
    assert events[-1]["type"] == "finished" and not [e for e in events if e["type"] == "system"]


def test_system_seconds_is_validated() -> None:
    assert config_module.parse("").metrics.system_seconds == 5.0
    assert config_module.parse("[metrics]\nsystem_seconds = 0\n").metrics.system_seconds == 0
    with pytest.raises(ConfigError, match=r"run.toml:3: 'metrics.system_seconds' must be at least 1 .*or 0 to turn "
                                          r"sampling off; got 0.2"):
        config_module.parse('[model]\n[metrics]\nsystem_seconds = 0.2\n', source="run.toml")
    with pytest.raises(ConfigError, match=r"'metrics.system_seconds' must be between 0.0 and 86400.0, got -1"):
        config_module.parse("[metrics]\nsystem_seconds = -1\n")
    with pytest.raises(ConfigError, match=r"'metrics.system_seconds' must be a finite number, got a string"):
        config_module.parse('[metrics]\nsystem_seconds = "5s"\n')


# -- NVML ------------------------------------------------------------------------------------


class FakeNvml:
    """A stand-in for pynvml (nvidia-ml-py): this machine has no NVIDIA GPU, so the real library
    cannot be exercised here. It answers as NVML does for one H200 (memory in bytes, power in
    milliwatts), or fails where told."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.fail = fail or set()
        self.calls: list[str] = []

    def _call(self, name: str, value: Any) -> Any:
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"NVMLError: {name}")
        return value

    def nvmlInit(self) -> None:
        self._call("init", None)

    def nvmlShutdown(self) -> None:
        self._call("shutdown", None)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self._call("index", f"gpu{index}")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        return self._call("uuid", uuid)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        return self._call("utilization", SimpleNamespace(gpu=87, memory=40))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return self._call("memory", SimpleNamespace(used=20 * 2**30, total=141 * 2**30, free=121 * 2**30))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> Any:
        return self._call("power", 412_345)


def test_nvml_readings_with_a_stand_in_for_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml is replaced by FakeNvml (no GPU on this machine); the units and the device follow NVML's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    fake = FakeNvml()
    gpu = Nvml.open(fake)
    assert gpu is not None and gpu.handle == "gpu3"  # the engine's device: the first visible one
    assert gpu.read() == {"gpu_utilization": 87, "gpu_memory_used": 20 * 2**30, "gpu_memory_total": 141 * 2**30,
                          "gpu_power": 412.3}
    monitor = SystemMonitor(1, nvml=fake)
    monitor._nvml = gpu
    sample = monitor.sample()
    assert sample.keys() >= GPU_FIELDS and sample["rss"] > 0
    gpu.close()
    assert fake.calls[-1] == "shutdown"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d5e0c6a")
    assert Nvml.open(FakeNvml()).handle == "GPU-8d5e0c6a"  # type: ignore[union-attr]


def test_no_nvml_or_no_gpu_leaves_the_gpu_fields_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partly with FakeNvml standing in for pynvml, which needs a GPU this machine does not have."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed: import fails
    assert Nvml.open() is None
    assert Nvml.open(FakeNvml(fail={"init"})) is None  # installed, but no driver
    failing = FakeNvml(fail={"index"})
    assert Nvml.open(failing) is None and failing.calls[-1] == "shutdown"  # no such device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Nvml.open(FakeNvml()) is None  # no GPU for this process
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    partial = Nvml.open(FakeNvml(fail={"power", "utilization"}))
    assert partial is not None and partial.read() == {"gpu_memory_used": 20 * 2**30, "gpu_memory_total": 141 * 2**30}
    monitor = SystemMonitor(0.05)  # the real thread, without NVML (pynvml cannot be imported)
    monitor.start()
    try:
        sample = wait_for(monitor.take, timeout=30)
    finally:
        monitor.close()
    assert not GPU_FIELDS & sample.keys() and {"cpu_percent", "rss", "memory_used", "memory_total"} <= sample.keys()


# -- the digest -------------------------------------------------------------------------------


def system(log: EventLog, i: int) -> None:
    log.emit("system", cpu_percent=float(i % 100), rss=2**20 * i, memory_used=2**30, memory_total=2**34)


def test_the_digest_thins_system_events_like_train_events(tmp_path: Path) -> None:
    """A run of days: 17,280 samples a day at the default 5 s. The digest keeps them bounded,
    evenly spread, the newest whole, and thins train events on their own count."""
    history = History(max_points=100, recent=50)
    log = EventLog("r", JournalWriter(tmp_path / "journal.ttj", history=history))
    for i in range(1, 20_001):
        system(log, i)
        if i % 10 == 0:  # ten samples to each report: thinning one type must not thin the other's
            log.emit("train", iteration=i, loss=1.0, learning_rate=1e-4, iterations_per_second=1.0,
                     tokens_per_second=1.0, trained_tokens=i, peak_memory=0.1)
    log.journal.close()
    _upto, records = history.records()
    events = [loads(payload) for _seq, payload in records]
    samples = [e["rss"] // 2**20 for e in events if e["type"] == "system"]
    assert 100 <= len(samples) <= 250 and samples[0] == 1
    assert samples[-50:] == list(range(19_951, 20_001))
    spread = [s for s in samples if s < 19_951]
    assert len({b - a for a, b in zip(spread, spread[1:], strict=False)}) == 1
    trains = [e["iteration"] for e in events if e["type"] == "train"]
    assert 100 <= len(trains) <= 250 and trains[0] == 10 and trains[-50:] == list(range(19_510, 20_001, 10))


# -- the TUI ----------------------------------------------------------------------------------


def recorded_with_system(gpu: bool = False) -> list[dict[str, Any]]:
    """The recorded run with a sample of the machine every 5 seconds of it."""
    events = recorded_events()
    out: list[dict[str, Any]] = []
    next_sample = T0 + 5.0
    for event in events:
        while event["ts"] >= next_sample and event["type"] not in ("state", "finished"):
            n = len([e for e in out if e["type"] == "system"])
            fields: dict[str, Any] = {"cpu_percent": 90.0 + n, "rss": (300 + n) * 2**20, "memory_used": 6 * 2**30,
                                      "memory_total": 16 * 2**30, "mlx_active": 50 * 2**20, "mlx_cache": 8 * 2**20,
                                      "mlx_peak": 60 * 2**20}
            if gpu:
                fields.update(gpu_utilization=80 + n % 10, gpu_memory_used=30 * 2**30,
                              gpu_memory_total=141 * 2**30, gpu_power=400.5)
            out.append(make_event(RUN_ID, 0, "system", ts=next_sample, **fields))
            next_sample += 5.0
        out.append(event)
    for seq, event in enumerate(out, start=1):
        event["seq"] = seq
    return out


def test_run_state_folds_system_events() -> None:
    state = RunState()
    state.apply_all(recorded_with_system(gpu=True))
    assert state.system_events == 4  # the recorded run lasts 21 s
    assert state.system["cpu_percent"] == 93.0 and state.system["gpu_power"] == 400.5
    assert state.system_series["rss"] == [float((300 + n) * 2**20) for n in range(4)]
    state.apply(make_event(RUN_ID, 10_000, "system", cpu_percent=5.0, rss=2**20))  # a reading left out
    assert "memory_used" not in state.system and len(state.system_series["memory_used"]) == 4


def test_sparkline_scales_to_its_top_or_its_range() -> None:
    assert spark([0, 50, 100], 10, top=100) == "▁▅█"
    assert spark([5.0, 5.0], 10) == "▄▄"
    assert spark(list(range(100)), 4) == "▁▃▆█"  # the newest four, least to most
    assert spark([], 5) == ""


async def test_the_panel_shows_a_live_engines_machine(sampled_run: RunDir) -> None:
    app = TunetopApp(sampled_run)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        panel = screen.query_one(SystemPanel)
        for _ in range(1200):  # a minute or more on a busy machine
            if screen.run_state.system_events >= 3 and panel.display and panel.size.height:
                break
            await pilot.pause(0.05)
        else:
            raise AssertionError("no system events reached the panel")
        await pilot.pause(0.5)
        shown = str(panel.render())
        lines = shown.splitlines()
        assert len(lines) == 2 and panel.region.height == 4  # two columns of two rows, in its border
        for name in ("cpu", "rss", "memory", "mlx +cache"):
            assert name in shown
        assert "gpu" not in shown and "power" not in shown  # nothing to show without NVML
        assert any(ch in shown for ch in "▁▂▃▄▅▆▇█")
        memory = screen.run_state.system
        assert f"/{memory['memory_total'] / 2**30:.1f}G" in shown
        await pilot.press("q")


async def test_the_panel_at_120x40_80x24_and_without_system_events(isolated_state: Path) -> None:
    run = write_recorded_run(isolated_state, recorded_with_system(gpu=True))
    app = TunetopApp(run, theme="dark", remember=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        panel = screen.query_one(SystemPanel)
        for _ in range(600):
            if screen.run_state.state == "finished" and panel.display and panel.size.height:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        shown = str(panel.render())
        assert shown.splitlines()[0].startswith("cpu") and len(shown.splitlines()) == 4  # 7 readings, 2 columns
        assert "93%" in shown and "400 W" in shown and "30.0G/141.0G" in shown and "6.0G/16.0G" in shown
        chart_rows = screen.query_one("#chart-box").size.height
        assert chart_rows >= 10 and panel.region.bottom <= screen.query_one("#log").region.y  # room for the chart
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.5)
        assert panel.has_class("compact") and panel.size.height == 1  # one line of readings
        assert str(panel.render()).startswith("cpu 93%  rss 303.0M")
        assert screen.query_one("#chart-box").size.height >= 4
    bare = write_recorded_run(isolated_state / "bare")  # a run without system events (older engines)
    app = TunetopApp(bare, theme="dark", remember=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        for _ in range(600):
            if screen.run_state.state == "finished":
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        assert not screen.query_one(SystemPanel).display  # hidden: the chart keeps the room


def test_a_system_event_costs_no_fsync_of_its_own(tmp_path: Path) -> None:
    """An fsync took 15 ms on a busy disk, on the loop's thread: machine readings ride along with the next one."""
    log = EventLog("r", JournalWriter(tmp_path / "journal.ttj"))
    synced: list[int] = []
    original = log.journal.sync
    log.journal.sync = lambda: (synced.append(log.last_seq), original())[1]  # type: ignore[method-assign]
    log._last_sync -= 2.0  # a second and more since the last fsync
    system(log, 1)
    assert synced == []
    log.emit("log", message="a line")  # any other event syncs, the reading with it
    assert synced == [2]
    log.close()
    assert [e["type"] for e in read_events(tmp_path / "journal.ttj")] == ["system", "log"]
