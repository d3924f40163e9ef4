"""How fast the TUI shows a long history, and what an attached TUI costs when idle.

    python bench/tui.py reattach [--count 1000000]
        a finished run with N journaled train events: seconds from app start until the
        dashboard shows the whole (downsampled) history
    python bench/tui.py idle [--seconds 20]
        CPU used by `tunetop attach` in tmux against a live, paused engine
    python bench/tui.py follow [--rate 10] [--seconds 30] [--history 3000] [--profile FILE]
        CPU used by `tunetop attach` in tmux following a live run that reports ``rate`` times a
        second (a stand-in engine: the real journal, history digest and ZeroMQ server, publishing
        train events, a validation every 50 and a log line every 100 iterations, heartbeats with
        the iteration); the TUI's CPU seconds come from /proc over the window, after 8 s to
        attach. ``--profile`` runs the TUI under cProfile and writes its stats there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx)


def reattach(args: argparse.Namespace) -> None:
    """A run with N journaled events, attached live (engine serving) and then opened finished."""
    from tunetop.control.events import EventLog
    from tunetop.control.history import History
    from tunetop.control.journal import JournalWriter
    from tunetop.control.server import attach_server
    from tunetop.runs.folders import RunDir, RunLock
    from tunetop.tui.app import TunetopApp
    from tunetop.tui.screens.dashboard import DashboardScreen

    home = Path(tempfile.mkdtemp(prefix="tt-bench-tui-"))
    os.environ["TUNETOP_HOME"] = str(home)
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ.setdefault("TUNETOP_SOCKET_DIR", tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    run = RunDir(home / "runs" / "20261129-000000-bench")
    run.path.mkdir(parents=True)
    started = time.perf_counter()
    log = EventLog(run.id, JournalWriter(run.journal, history=History()))
    log.emit("run_started", config={}, model="bench", trainable_parameters=1, total_parameters=2,
             iterations=args.count, name="bench")
    log.emit("state", state="running")
    for i in range(1, args.count + 1):
        log.emit("train", iteration=i, loss=2.0 - i / args.count, learning_rate=1e-4, iterations_per_second=10.0,
                 tokens_per_second=1000.0, trained_tokens=i * 100, peak_memory=0.5)
        if i % 1000 == 0:
            log.emit("validation", iteration=i, loss=2.5 - i / args.count, seconds=0.1)
    print(f"journaled {log.last_seq:,} events ({run.journal.stat().st_size / 1e6:.0f} MB) in "
          f"{time.perf_counter() - started:.0f}s")

    async def measure() -> float:
        app = TunetopApp(run, remember=False)
        start = time.perf_counter()
        async with app.run_test(size=(160, 45)) as pilot:
            screen = app.screen
            assert isinstance(screen, DashboardScreen)
            while screen.run_state.iteration < args.count or len(screen.run_state.validations) < args.count // 1000:
                await pilot.pause(0.01)
            screen.repaint()
            await pilot.pause()
            return time.perf_counter() - start

    class StandIn:  # the engine's side of the control plane, without training
        run_dir = run
        state = "running"
        trainer = None
        events = log
        on_close: list[object] = []

        def status_result(self) -> dict[str, object]:
            return {}

    lock = RunLock(run)
    lock.acquire()
    server = attach_server(StandIn())  # type: ignore[arg-type]
    live = asyncio.run(measure())
    server.close()
    lock.release()
    print(f"{args.count:,} train events, live engine:     full (downsampled) history on screen after {live:.2f}s")
    log.close()  # as the engine does at exit: the digest is saved beside the journal
    finished = asyncio.run(measure())
    print(f"{args.count:,} train events, finished run:    full (downsampled) history on screen after {finished:.2f}s")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(args: argparse.Namespace) -> None:
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed (bash .ci/setup installs it)")
    home = Path(tempfile.mkdtemp(prefix="tt-bench-idle-"))
    env = dict(os.environ, TUNETOP_HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    cli = [sys.executable, "-m", "tunetop.cli"]
    config = home / "run.toml"
    subprocess.run([*cli, "init", str(config)], env=env, check=True, capture_output=True)
    config.write_text(config.read_text().replace("iterations = 300", "iterations = 100000"))
    run_id = subprocess.run([*cli, "train", str(config), "--detach"], env=env, check=True, capture_output=True,
                            text=True).stdout.strip()
    time.sleep(3)
    subprocess.run([*cli, "pause", run_id], env=env, check=True, capture_output=True)
    sock = f"tt-bench-{os.getpid()}"
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("TUNETOP_", "XDG_")) or k == "PYTHONPATH")
    command = f"cd {ROOT} && exec env {exports} {' '.join(cli)} attach {run_id}"
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "160", "-y", "45", command], check=True)
    try:
        time.sleep(5)
        pane_pid = int(subprocess.run(["tmux", "-L", sock, "display", "-p", "#{pane_pid}"], capture_output=True,
                                      text=True, check=True).stdout.strip())
        before = _cpu_seconds(pane_pid)
        time.sleep(args.seconds)
        used = _cpu_seconds(pane_pid) - before
        print(f"attached TUI, paused engine: {used:.2f} CPU-seconds in {args.seconds}s = {100 * used / args.seconds:.1f}% of one core")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], check=False)
        subprocess.run([*cli, "stop", run_id], env=env, check=False, capture_output=True)


def follow(args: argparse.Namespace) -> None:
    """A live run publishing ``rate`` reports a second, and the TUI following it in tmux."""
    import threading

    from tunetop.control.events import EventLog
    from tunetop.control.history import History
    from tunetop.control.journal import JournalWriter
    from tunetop.control.server import attach_server
    from tunetop.runs.folders import RunDir, RunLock

    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed (bash .ci/setup installs it)")
    home = Path(tempfile.mkdtemp(prefix="tt-bench-follow-"))
    env = dict(os.environ, TUNETOP_HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    os.environ.update(TUNETOP_HOME=env["TUNETOP_HOME"], XDG_CONFIG_HOME=env["XDG_CONFIG_HOME"])
    run = RunDir(home / "runs" / "20261129-000000-follow")
    run.path.mkdir(parents=True)
    log = EventLog(run.id, JournalWriter(run.journal, history=History()))
    total = 10**6
    log.emit("run_started", config={"training": {"iterations": total}}, model="bench", trainable_parameters=65536,
             total_parameters=718720, iterations=total, name="follow")
    log.emit("state", state="running")

    class Trainer:
        iteration = 0

    def report(i: int) -> None:
        log.emit("train", iteration=i, loss=2.0 / (1 + i / 500) + 0.05 * ((i * 7919) % 13) / 13, learning_rate=1e-4,
                 iterations_per_second=float(args.rate), tokens_per_second=4000.0 + (i % 17) * 10,
                 trained_tokens=i * 400, peak_memory=0.07)
        if i % 50 == 0:
            log.emit("validation", iteration=i, loss=2.1 / (1 + i / 500), seconds=0.4)
        if i % 100 == 0:
            log.emit("log", message=f"iteration {i}: a log line")
        Trainer.iteration = i

    for i in range(1, args.history + 1):  # a run some way in: the chart and tables have content
        report(i)

    class StandIn:  # the engine's side of the control plane, without training
        run_dir = run
        state = "running"
        trainer = Trainer
        events = log
        on_close: list[object] = []

        def status_result(self) -> dict[str, object]:
            return {}

    lock = RunLock(run)
    lock.acquire()
    server = attach_server(StandIn())  # type: ignore[arg-type]
    stop = threading.Event()
    published = [0]

    def publish() -> None:
        i, period, due = args.history, 1.0 / args.rate, time.monotonic()
        while not stop.is_set():
            i += 1
            report(i)
            published[0] += 1
            due += period
            stop.wait(max(0.0, due - time.monotonic()))

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    sock = f"tt-bench-follow-{os.getpid()}"
    python = [sys.executable] + (["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else [])
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("TUNETOP_", "XDG_")) or k == "PYTHONPATH")
    command = f"cd {ROOT} && exec env {exports} {' '.join(python)} -m tunetop.cli attach {run.id}"
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "160", "-y", "45", command], check=True)
    try:
        time.sleep(8)
        pane_pid = int(subprocess.run(["tmux", "-L", sock, "display", "-p", "#{pane_pid}"], capture_output=True,
                                      text=True, check=True).stdout.strip())
        before, sent = _cpu_seconds(pane_pid), published[0]
        time.sleep(args.seconds)
        used, sent = _cpu_seconds(pane_pid) - before, published[0] - sent
        lags = []
        for _ in range(5):  # how far behind the header's iteration is, at a few moments
            latest = Trainer.iteration
            screen = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p"], capture_output=True, text=True).stdout
            shown = re.search(r"iter ([\d,]+)/", screen)
            lags.append(latest - int(shown.group(1).replace(",", "")) if shown else -1)
            time.sleep(0.37)
        print(f"attached TUI following {sent / args.seconds:.1f} reports/s ({args.history:,} before): {used:.2f} CPU-seconds "
              f"in {args.seconds}s = {100 * used / args.seconds:.1f}% of one core; the header behind the engine by "
              f"{', '.join(map(str, lags))} iterations")
        if args.profile:
            subprocess.run(["tmux", "-L", sock, "send-keys", "q"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Path(f"/proc/{pane_pid}").exists():
                time.sleep(0.2)
    finally:
        stop.set()
        publisher.join()
        subprocess.run(["tmux", "-L", sock, "kill-server"], check=False, capture_output=True)
        server.close()
        lock.release()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("reattach")
    p.add_argument("--count", type=int, default=1_000_000)
    p = sub.add_parser("idle")
    p.add_argument("--seconds", type=int, default=20)
    p = sub.add_parser("follow")
    p.add_argument("--rate", type=float, default=10.0, help="train reports a second")
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--history", type=int, default=3000, help="train reports journaled before the TUI attaches")
    p.add_argument("--profile", default="", help="write the TUI's cProfile stats here")
    args = parser.parse_args()
    {"reattach": reattach, "idle": idle, "follow": follow}[args.what](args)


if __name__ == "__main__":
    main()
