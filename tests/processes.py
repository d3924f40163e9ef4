"""No test leaves a process behind, passing, failing, timed out or killed (a pytest plugin).

Every process a test starts inherits the environment variable ``TUNETOP_TEST_OWNER`` from the
pytest process that runs it: engines in their own sessions, the followers they start, sshd and
the sessions it forks, tmux servers and their panes. ``/proc/PID/environ`` keeps it for the
process's whole life, whatever its session, process group or parent, so a sweep over ``/proc``
finds them all. The value is a list of tokens, one per pytest level (a test run inside a test
adds its own): ``SESSION/WORKER`` for the pytest process that runs tests, ``SESSION/WORKER/N``
while test N runs. Three sweeps end (SIGKILL) what carries a token:

- after each test's teardown, that test's token (what its fixtures did not stop, still running
  ``GRACE`` seconds later; named in a warning, so the leak gets fixed at its source);
- at the end of the session, the session's (processes started by module or session fixtures);
- from a watchdog process, the session's too, as soon as the pytest process it watches is gone
  however it ended: killed by CI, or ended by pytest-timeout's ``thread`` method (``os._exit``).

Processes started by module- or session-scoped fixtures carry the worker's token and live until
the end of the session. The tokens are unique per run, so two test runs on one machine (other
checkouts, other users' runs) never touch each other's processes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

OWNER = "TUNETOP_TEST_OWNER"
GRACE = 5.0
"""Seconds a test's processes get to end by themselves after its teardown (a busy machine)."""
ROOT = Path(__file__).resolve().parent.parent


def _tokens(pid: int) -> list[str]:
    """The owner tokens in a process's environment ([] if none, or it is gone or not ours)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            data = file.read()
    except OSError:
        return []
    prefix = OWNER.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace").split()
    return []


def _owned(tokens: list[str], owner: str) -> bool:
    return any(token == owner or token.startswith(owner + "/") for token in tokens)


def _ancestors() -> set[int]:
    """This process and its parents: never swept, whatever they carry."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def owned_processes(owner: str) -> list[int]:
    """Live processes whose environment carries ``owner`` (or a token under it)."""
    if not Path("/proc/self/environ").exists():
        return []  # no /proc (macOS): nothing to sweep with
    spared = _ancestors()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in spared and _owned(_tokens(int(entry.name)), owner):
            pids.append(int(entry.name))
    return pids


def _describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"{pid} ({command[:160]})"


def _kill(pid: int, owner: str) -> bool:
    """SIGKILL ``pid`` if it still carries ``owner``; through a pidfd, so a reused pid is never hit."""
    try:
        handle = os.pidfd_open(pid)
    except (OSError, AttributeError):
        handle = None
    try:
        if not _owned(_tokens(pid), owner):  # read after the pidfd pinned the process
            return False
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if handle is not None:
            os.close(handle)


def sweep(owner: str, grace: float = 0.0, seconds: float = 10.0) -> list[str]:
    """Kill every process carrying ``owner``, again until none is left (one may start another
    while we look); returns what was killed, as "pid (command line)". Those found get ``grace``
    seconds to end on their own first (an engine that has released its run may still be exiting)."""
    deadline = time.monotonic() + grace
    while owned_processes(owner) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = owned_processes(owner)
        if not pids:
            break
        for pid in pids:
            description = _describe(pid)
            if _kill(pid, owner):
                killed.append(description)
        time.sleep(0.05)  # a killed process leaves /proc (or becomes a zombie, with no environ) at once
    return killed


def start_watchdog(owner: str) -> subprocess.Popen[bytes]:
    """A process in its own session that sweeps ``owner`` once this process is gone (its stdin,
    a pipe only we hold, reaches end of file) or asks it to (closes that pipe)."""
    env = {k: v for k, v in os.environ.items() if k != OWNER}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.processes", owner, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,  # a Ctrl-C or a killed process group spares it
    )


def _watch(owner: str, parent: int) -> None:
    """The watchdog's body: wait for the parent's end (or its word), then sweep."""
    while True:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], 1.0)
        if readable and not sys.stdin.buffer.read1(4096):
            break  # end of file: the parent closed the pipe or is gone
        if os.getppid() != parent:
            break  # re-parented: the parent is gone (a child of it may still hold the pipe)
    sweep(owner, seconds=30.0)


# -- the plugin ---------------------------------------------------------------------------------


class _Session:
    def __init__(self, base: str, owner: str | None, sweeps: str) -> None:
        self.base = base  # the owner value this process inherited (from a test run around it)
        self.owner = owner  # our worker token: what tests here are marked with (None: xdist controller)
        self.sweeps = sweeps  # what the session-end sweep and the watchdog end
        self.count = 0
        self.watchdog = start_watchdog(sweeps) if Path("/proc/self/environ").exists() else None


_session: _Session | None = None


def _with(base: str, token: str) -> str:
    return f"{base} {token}".strip()


_SESSION_KEY = pytest.StashKey[str]()


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process hands tests to xdist workers (and runs none itself)."""
    return (
        not config.getoption("collectonly")
        and config.getoption("dist", default="no") != "no"
        and bool(config.getoption("tx", default=None))
    )


def pytest_configure(config: pytest.Config) -> None:
    global _session
    base = os.environ.get(OWNER, "")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller named the session
        owner = f"{workerinput['tunetop_session']}/{workerinput['workerid']}"
        _session = _Session(base, owner, owner)
    else:
        session = uuid.uuid4().hex[:12]
        config.stash[_SESSION_KEY] = session
        # The controller marks nothing: the workers it starts must not carry its token.
        owner = None if _xdist_controller(config) else f"{session}/main"
        _session = _Session(base, owner, owner or session)
    if _session.owner is not None:
        os.environ[OWNER] = _with(base, _session.owner)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]  # xdist's: each worker's input
    node.workerinput["tunetop_session"] = node.config.stash[_SESSION_KEY]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    global _session
    if _session is None:
        return
    left = sweep(_session.sweeps)
    if left:
        print(f"\ntests/processes.py: ended {len(left)} process(es) the tests left running: " + "; ".join(left),
              file=sys.stderr)
    if _session.watchdog is not None:
        _session.watchdog.stdin.close()  # type: ignore[union-attr]
        try:
            _session.watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _session.watchdog.kill()
    if _session.owner is not None:
        os.environ[OWNER] = _session.base
    _session = None


@pytest.fixture(autouse=True)
def _process_owner() -> Iterator[None]:
    """Marks the processes this test starts (from here on: after higher-scoped fixtures)."""
    if _session is None or _session.owner is None:
        yield
        return
    _session.count += 1
    os.environ[OWNER] = _with(_session.base, f"{_session.owner}/{_session.count}")
    try:
        yield
    finally:
        os.environ[OWNER] = _with(_session.base, _session.owner)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    if _session is None or _session.owner is None:
        return
    left = sweep(f"{_session.owner}/{_session.count}", grace=GRACE)
    if left:
        warnings.warn(
            f"{item.nodeid} left {len(left)} process(es) running ({GRACE:.0f} s after it), ended now: " + "; ".join(left),
            pytest.PytestWarning,
            stacklevel=1,
        )


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
