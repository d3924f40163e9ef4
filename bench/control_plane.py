"""What the control plane costs, and how fast it moves events.

    python bench/control_plane.py overhead [--iters 300] [--rounds 3] [--system-seconds S]
        trainer steps/s: bare loop vs. the engine with journal + server + 2 attached client processes
        (and the machine sampled every S seconds: metrics.system_seconds, the config's default unless given)
    python bench/control_plane.py events [--count 200000]
        events/s through EventLog (journal append + PUB) with one subscriber counting them
    python bench/control_plane.py system [--count 2000]
        what sampling the machine costs: a sample on its thread, and taking + journaling it on the loop
    python bench/control_plane.py replay [--count 1000000]
        a journal of N events: raw read, replay over ZeroMQ to a client, and folding into RunState
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
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


def _config(iters: int, report: int) -> Any:
    from tunetop.training import config as config_module

    cfg = config_module.parse(config_module.starter_text())
    cfg.training.iterations = iters
    cfg.training.steps_per_report = report
    cfg.training.steps_per_eval = 10**9
    cfg.checkpoints.save_every = 10**9
    return cfg


def bare_loop(iters: int, report: int, scratch: Path) -> float:
    from tunetop.training.build import build_trainer
    from tunetop.training.trainer import run_loop

    trainer, *_ = build_trainer(_config(iters, report), scratch / "bare")
    trainer.valid_plan = None
    trainer.step()  # compile outside the timing, as in the engine run below
    start = time.perf_counter()
    run_loop(trainer, lambda _e: None)
    return (iters - 1) / (time.perf_counter() - start)


class _Subscriber:
    """A client process that replays, then keeps receiving live events, as a TUI does."""

    def __init__(self, endpoints: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_subscriber", endpoints.events, endpoints.commands],
            stdout=subprocess.PIPE, text=True,
        )
        self.received = 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=30)
        self.received = int(out.strip().splitlines()[-1]) if out.strip() else 0


def subscriber_main(events_endpoint: str, commands_endpoint: str) -> None:
    """The client process: replay, then count live events until SIGINT; print the count."""
    import zmq

    from tunetop.runs.client_sync import replay

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events_endpoint)
    received = len(replay(commands_endpoint)[0])
    try:
        while True:  # blocks until an event (a TUI wakes at most 8 times a second to repaint)
            sub.recv_multipart()
            received += 1
    except KeyboardInterrupt:
        pass
    print(received, flush=True)


def engine_loop(iters: int, report: int, scratch: Path, clients: int, system_seconds: float | None = None) -> tuple[float, int, int]:
    """(steps/s, events the clients received, system events the engine journaled)."""
    from tunetop.control.server import attach_server
    from tunetop.runs.client_sync import run_endpoints
    from tunetop.runs.engine import Engine
    from tunetop.runs.folders import RunDir

    run = RunDir(scratch / f"run-{time.monotonic_ns()}")
    run.path.mkdir(parents=True)
    cfg = _config(iters, report)
    if system_seconds is not None:
        cfg.metrics.system_seconds = system_seconds
    owner = Engine(cfg, run)
    owner.on_ready.append(attach_server)
    subscribers: list[_Subscriber] = []
    timing: dict[str, float] = {}
    original_build = owner._build

    def build_and_warm(*args: Any) -> Any:
        built = original_build(*args)
        trainer = built[0]
        trainer.valid_plan = None
        trainer.parameters.iterations = iters
        trainer.step()  # compile outside the timing
        for _ in range(clients):
            subscribers.append(_Subscriber(run_endpoints(run)))
        time.sleep(1.0)  # the clients start, replay, and go live
        timing["start"] = time.perf_counter()
        return built

    owner._build = build_and_warm  # type: ignore[method-assign]
    owner.run()
    seconds = time.perf_counter() - timing["start"]
    for subscriber in subscribers:
        subscriber.stop()
    from tunetop.control.journal import read_events

    sampled = sum(1 for event in read_events(run.journal) if event["type"] == "system")
    return (iters - 1) / seconds, sum(s.received for s in subscribers), sampled


def overhead(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    for report in args.reports:
        bare: list[float] = []
        full: list[float] = []
        received = sampled = 0
        for round_ in range(args.rounds):
            # Interleaved, and the order alternates: runs share one process, and whichever runs
            # second in it was measured slower, whatever it was.
            order = ("bare", "engine") if round_ % 2 == 0 else ("engine", "bare")
            for which in order:
                if which == "bare":
                    bare.append(bare_loop(args.iters, report, scratch))
                else:
                    rate, received, sampled = engine_loop(args.iters, report, scratch, args.clients, args.system_seconds)
                    full.append(rate)
        b, f = statistics.median(bare), statistics.median(full)
        print(
            f"steps_per_report={report:<3} bare loop {b:7.2f} steps/s   engine+journal+server+{args.clients} clients "
            f"{f:7.2f} steps/s   difference {100 * (b - f) / b:+.2f}%   (median of {args.rounds}, order alternating; "
            f"clients received {received} events, the engine journaled {sampled} system events in the last round)"
        )


def events(args: argparse.Namespace) -> None:
    import zmq

    from tunetop.control.events import EventLog
    from tunetop.control.journal import JournalWriter
    from tunetop.control.server import Server
    from tunetop.runs.folders import RunDir

    scratch = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    run = RunDir(scratch / "events-run")
    run.path.mkdir()

    class FakeEngine:
        run_dir = run
        state = "running"
        trainer = None
        events: EventLog | None = None

        def status_result(self) -> dict[str, Any]:
            return {}

    fake = FakeEngine()
    fake.events = EventLog(run.id, JournalWriter(run.journal))
    server = Server(fake)  # type: ignore[arg-type]
    server.start()
    fake.events.subscribers.append(server.publish)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(server.endpoints.events)
    time.sleep(0.3)
    count = {"n": 0}

    def drain() -> None:
        while sub.poll(1000):
            sub.recv_multipart()
            count["n"] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    start = time.perf_counter()
    for i in range(args.count):
        fake.events.emit("train", iteration=i, loss=1.0, learning_rate=1e-4, iterations_per_second=1.0,
                         tokens_per_second=1.0, trained_tokens=i, peak_memory=0.1)
    emitted = time.perf_counter() - start
    reader.join()
    server.close()
    print(f"emitted {args.count} events in {emitted:.2f}s: {args.count / emitted:,.0f} events/s "
          f"(journaled + published); the subscriber received {count['n']:,} live (PUB drops beyond its high-water mark; "
          "clients replay what they miss)")


def replay_bench(args: argparse.Namespace) -> None:
    from tunetop.control.events import EventLog
    from tunetop.control.history import History, read_history, write_digest
    from tunetop.control.journal import JournalWriter, read_payloads, scan
    from tunetop.control.protocol import encode, loads, make_event
    from tunetop.control.server import Server
    from tunetop.runs.client_sync import replay
    from tunetop.runs.folders import RunDir
    from tunetop.tui.state import RunState

    scratch = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    run = RunDir(scratch / "replay-run")
    run.path.mkdir()
    history = History()
    writer = JournalWriter(run.journal, history=history)
    start = time.perf_counter()
    for i in range(1, args.count + 1):
        event = make_event(run.id, i, "train", ts=1.0 + i, iteration=i, loss=2.0 - i / args.count,
                           learning_rate=1e-4, iterations_per_second=10.0, tokens_per_second=1000.0,
                           trained_tokens=i * 100, peak_memory=0.5)
        writer.append(event, encode(event))
    writer.sync()
    print(f"wrote {args.count:,} events ({run.journal.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f}s")

    def best_of_three(read: Any) -> tuple[float, int]:
        times, count = [], 0
        for _ in range(3):
            start = time.perf_counter()
            count = sum(1 for _ in read())
            times.append(time.perf_counter() - start)
        return min(times), count

    def walk() -> Any:  # the reader before the seal: framing + CRC of every record in Python
        return scan(run.journal.read_bytes())

    took, n = best_of_three(walk)
    print(f"read back, record by record:           {took:6.2f}s for {n:,} events (best of 3)")
    took, n = best_of_three(lambda: read_payloads(run.journal))
    print(f"read back, seal + index:               {took:6.2f}s for {n:,} events (best of 3)")
    start = time.perf_counter()
    _upto, kept = read_history(run.journal)
    print(f"history digest, journal only:          {time.perf_counter() - start:6.2f}s ({len(kept):,} events kept)")
    write_digest(history, run.journal, writer.end_offset)
    start = time.perf_counter()
    _upto, kept = read_history(run.journal)
    decoded = [loads(payload) for _seq, payload in kept]
    print(f"history digest, saved + decoded:       {time.perf_counter() - start:6.2f}s ({len(decoded):,} events)")

    class FakeEngine:
        run_dir = run
        state = "finished"
        trainer = None
        events = EventLog(run.id, writer)

        def status_result(self) -> dict[str, Any]:
            return {}

    server = Server(FakeEngine())  # type: ignore[arg-type]
    server.start()
    start = time.perf_counter()
    got, end = replay(server.endpoints.commands, since=0, timeout=120)
    print(f"replay over ZeroMQ + JSON decode:      {time.perf_counter() - start:6.2f}s for {len(got):,} events (END={end})")
    start = time.perf_counter()
    state = RunState()
    state.apply_all(got)
    print(f"fold into the TUI's RunState:          {time.perf_counter() - start:6.2f}s (last iteration {state.iteration:,})")
    server.close()
    json.dumps({})


def system_bench(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from tunetop.control.events import EventLog
    from tunetop.control.journal import JournalWriter
    from tunetop.runs.machine import SystemMonitor, mlx_memory
    from tunetop.training.config import RunConfig

    mx.eval(mx.ones((1024, 1024)))  # MLX loaded and holding memory, as in a run
    monitor = SystemMonitor(5.0)
    start = time.perf_counter()
    for _ in range(args.count):
        sample = monitor.sample()
    on_thread = (time.perf_counter() - start) / args.count
    scratch = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    log = EventLog("bench", JournalWriter(scratch / "journal.ttj"))
    start = time.perf_counter()
    for _ in range(args.count):
        log.emit("system", **sample, **mlx_memory())
    on_loop = (time.perf_counter() - start) / args.count
    lone = []
    for _ in range(50):  # the usual case: the last sync a second or more ago (once a second at most)
        log._last_sync -= 2.0
        start = time.perf_counter()
        log.emit("system", **sample, **mlx_memory())
        lone.append(time.perf_counter() - start)
    alone = statistics.median(lone)
    log.close()
    every = RunConfig().metrics.system_seconds
    print(f"one sample on its thread: {on_thread * 1e6:7.1f} us   taking + journaling it on the loop: {on_loop * 1e6:7.1f} us "
          f"(mean of {args.count:,}; fields {sorted(sample)} + mlx)")
    print(f"one alone, a second after the journal's last fsync: {alone * 1e6:7.1f} us (median of 50; "
          "system events cost no fsync of their own, control.events.UNSYNCED_TYPES)")
    print(f"at the default metrics.system_seconds = {every:g}: the loop's share {100 * alone / every:.4f}%, "
          f"the thread's {100 * on_thread / every:.4f}% of one core")

def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_subscriber":  # a client process of `overhead`
        subscriber_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--reports", type=int, nargs="+", default=[10, 1], help="steps_per_report values to try")
    p.add_argument("--clients", type=int, default=2, help="client processes attached (replay, then live)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--system-seconds", type=float, default=None,
                   help="metrics.system_seconds for the engine (default: the config's default; 0 = off)")
    p = sub.add_parser("events")
    p.add_argument("--count", type=int, default=200_000)
    p = sub.add_parser("replay")
    p.add_argument("--count", type=int, default=1_000_000)
    p = sub.add_parser("system")
    p.add_argument("--count", type=int, default=2_000)
    args = parser.parse_args()
    {"overhead": overhead, "events": events, "replay": replay_bench, "system": system_bench}[args.what](args)


if __name__ == "__main__":
    main()
