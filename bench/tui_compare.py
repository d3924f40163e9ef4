"""What the comparison screen costs while its runs train: the TUI's CPU following N live runs.

    python bench/tui_compare.py [--runs 2] [--rate 10] [--seconds 30] [--history 3000]

N stand-in engines (each as in ``bench/tui.py follow``: the real journal, history digest and
ZeroMQ server in this process, publishing train events ``rate`` times a second, a validation
every 50 and a log line every 100 iterations, heartbeats) train side by side; ``tunetop`` opens
the runs list in tmux (160 x 45), marks every run (space) and opens their comparison (c). The
TUI's CPU seconds come from /proc over the window, after 8 s to attach; ``--runs 1 --dashboard``
measures one run's dashboard the same way, for reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx)
from bench.tui import _cpu_seconds  # noqa: E402


class StandIn:
    """One run's engine side of the control plane, without training: it publishes reports."""

    def __init__(self, home: Path, number: int, rate: float, history: int) -> None:
        from tunetop.control.events import EventLog
        from tunetop.control.history import History
        from tunetop.control.journal import JournalWriter
        from tunetop.control.server import attach_server
        from tunetop.runs.folders import RunDir, RunLock

        self.run_dir = RunDir(home / "runs" / f"20261129-00000{number}-cmp{number}")
        self.run_dir.path.mkdir(parents=True)
        self.events = self.log = EventLog(self.run_dir.id, JournalWriter(self.run_dir.journal, history=History()))
        self.rate, self.number = rate, number
        self.state = "running"
        self.on_close: list[object] = []
        self.trainer = self
        self.iteration = 0
        self.log.emit("run_started", config={"training": {"iterations": 10**6}, "optimizer": {"learning_rate": 1e-4 * (number + 1)}},
                      model="bench", trainable_parameters=65536, total_parameters=718720, iterations=10**6, name=f"cmp{number}")
        self.log.emit("state", state="running")
        for i in range(1, history + 1):  # runs some way in: the chart and table have content
            self.report(i)
        self.run_dir.write_status({"name": f"cmp{number}", "state": "running", "iteration": history, "iterations": 10**6})
        self.lock = RunLock(self.run_dir)
        self.lock.acquire()
        self.server = attach_server(self)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._publish, args=(history,), daemon=True)
        self.thread.start()

    def status_result(self) -> dict[str, Any]:
        return {}

    def report(self, i: int) -> None:
        scale = 1.0 + 0.2 * self.number
        self.log.emit("train", iteration=i, loss=scale * 2.0 / (1 + i / 500) + 0.05 * ((i * 7919) % 13) / 13,
                      learning_rate=1e-4, iterations_per_second=self.rate, tokens_per_second=4000.0 + (i % 17) * 10,
                      trained_tokens=i * 400, peak_memory=0.07)
        if i % 50 == 0:
            self.log.emit("validation", iteration=i, loss=scale * 2.1 / (1 + i / 500), seconds=0.4)
        if i % 100 == 0:
            self.log.emit("log", message=f"iteration {i}: a log line")
        self.iteration = i

    def _publish(self, i: int) -> None:
        period, due = 1.0 / self.rate, time.monotonic()
        while not self.stop.is_set():
            i += 1
            self.report(i)
            due += period
            self.stop.wait(max(0.0, due - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()
        self.lock.release()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=10.0, help="train reports a second, each run")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--history", type=int, default=3000, help="train reports journaled before the TUI opens")
    parser.add_argument("--dashboard", action="store_true", help="open the first run's dashboard instead (reference)")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed (bash .ci/setup installs it)")
    home = Path(tempfile.mkdtemp(prefix="tt-bench-compare-"))
    env = dict(os.environ, TUNETOP_HOME=str(home), XDG_CONFIG_HOME=str(home / "config"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    os.environ.update(TUNETOP_HOME=env["TUNETOP_HOME"], XDG_CONFIG_HOME=env["XDG_CONFIG_HOME"])
    runs = [StandIn(home, n, args.rate, args.history) for n in range(args.runs)]
    sock = f"tt-bench-compare-{os.getpid()}"
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("TUNETOP_", "XDG_")) or k == "PYTHONPATH")
    what = f"attach {runs[0].run_dir.id}" if args.dashboard else ""
    command = f"cd {ROOT} && exec env {exports} {sys.executable} -m tunetop.cli {what}"
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "160", "-y", "45", command], check=True)
    try:
        if not args.dashboard:
            time.sleep(4)  # the runs list is up
            subprocess.run(["tmux", "-L", sock, "send-keys", *(["Space"] * args.runs), "c"], check=True)
        time.sleep(8)
        screen = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p"], capture_output=True, text=True).stdout
        if not args.dashboard and "comparing" not in screen:
            raise SystemExit("the comparison did not open:\n" + screen)
        pane_pid = int(subprocess.run(["tmux", "-L", sock, "display", "-p", "#{pane_pid}"], capture_output=True,
                                      text=True, check=True).stdout.strip())
        before = _cpu_seconds(pane_pid)
        time.sleep(args.seconds)
        used = _cpu_seconds(pane_pid) - before
        view = "one run's dashboard" if args.dashboard else f"the comparison of {args.runs} runs"
        print(f"{view}, each reporting {args.rate:g} times a second ({args.history:,} before): {used:.2f} CPU-seconds "
              f"in {args.seconds}s = {100 * used / args.seconds:.1f}% of one core")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], check=False, capture_output=True)
        for run in runs:
            run.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
