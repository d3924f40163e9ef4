"""Other local users: they read nothing of a run, cannot hold its lock, cannot squat its sockets.

Real users, real permissions: a second local user (created with useradd if absent; needs
root, skipped with the reason otherwise) tries, through setpriv, what a curious or hostile
neighbour would, against a victim whose home folder is world-readable (0755, as many
distributions make it).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, tunetop, wait_for, write_config
from tests.processes import OWNER
from tunetop.control.journal import read_events
from tunetop.runs.folders import RunDir, RunError, RunLock, list_runs, resolve

INTRUDER = "tunetop-intruder"
HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "fcntl.flock(fd, fcntl.LOCK_SH)\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture(scope="module")
def intruder() -> tuple[int, int]:
    """(uid, gid) of a second local user, created if absent."""
    if os.geteuid() != 0:
        pytest.skip("acting as a second local user needs root (useradd, setpriv)")
    # Parallel workers may both get here: one adds the user, the other then finds it.
    with open(Path(tempfile.gettempdir()) / "tunetop-tests-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entry = pwd.getpwnam(INTRUDER)
        except KeyError:
            made = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", INTRUDER],
                capture_output=True, text=True,
            )
            if made.returncode != 0 and "already exists" not in made.stderr:
                pytest.skip(f"cannot create a second local user: {made.stderr.strip()}")
            entry = pwd.getpwnam(INTRUDER)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def victim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home folder others may enter (0755), with tunetop's state in the default place."""
    base = Path(tempfile.mkdtemp(prefix="tt-victim-", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    for folder in (base, home):
        folder.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TUNETOP_HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    try:
        yield home
    finally:
        shutil.rmtree(base, ignore_errors=True)


def state_root(home: Path) -> Path:
    return home / ".local" / "state" / "tunetop"


def as_user(ids: tuple[int, int], args: list[str], home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as the other user, pointed at the victim's state."""
    return subprocess.run(setpriv(ids, args), capture_output=True, text=True, timeout=120, env=intruder_env(home), cwd="/")


def setpriv(ids: tuple[int, int], args: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--", *args]


def intruder_env(home: Path | None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LANG": "C"}
    if OWNER in os.environ:  # what the other user starts is this test's too (tests/processes.py)
        env[OWNER] = os.environ[OWNER]
    if home is not None:
        env.update(HOME=str(home), TUNETOP_HOME=str(state_root(home)))
    return env


def finished_run(tmp_path: Path, **training: int) -> RunDir:
    config = write_config(
        tmp_path / "run.toml",
        training={"iterations": 6, "steps_per_report": 2, "steps_per_eval": 6, **training},
        checkpoints={"save_every": 3},
        metrics={"tensorboard": True},
    )
    run = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    wait_for(lambda: not run.is_alive(), timeout=180)
    assert run.status()["state"] == "finished"
    return run


def modes(root: Path) -> dict[str, int]:
    found = {str(root): root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path)] = path.stat().st_mode & 0o777
    return found


def test_another_user_reads_nothing_of_a_run(tmp_path: Path, victim: Path, intruder: tuple[int, int]) -> None:
    run = finished_run(tmp_path)
    root = state_root(victim)
    assert run.path.parent.parent == root
    # Folders 0700 and files 0600, the state root included.
    loose = {path: mode for path, mode in modes(root).items() if mode not in (0o700, 0o600)}
    assert not loose, loose
    secrets = [
        run.config, run.journal, run.log, run.status_file, run.lock_file, run.path / "history.ttj",
        run.endpoints_file, run.adapters / "adapters.safetensors", run.adapters / "adapter_config.json",
        *sorted(run.checkpoints.glob("*/*.safetensors")), *sorted((run.path / "tensorboard").iterdir()),
    ]
    assert all(path.is_file() for path in secrets) and len(secrets) >= 13
    for path in secrets:
        read = as_user(intruder, ["cat", str(path)])
        assert read.returncode != 0 and "Permission denied" in read.stderr, (path, read)
    for folder in (root, run.path, run.checkpoints):
        listed = as_user(intruder, ["ls", str(folder)])
        assert listed.returncode != 0 and "Permission denied" in listed.stderr, (folder, listed)
    # Nor can they hold the lock that would block a resume.
    locked = as_user(intruder, ["flock", "--nonblock", "--shared", str(run.lock_file), "true"])
    assert locked.returncode != 0, locked
    # Their tunetop says so in a sentence, not a traceback.
    listing = as_user(intruder, [sys.executable, "-m", "tunetop.cli", "ls"], victim)
    assert listing.returncode == 2 and "Traceback" not in listing.stderr, listing
    assert "permission denied" in listing.stderr and "private" in listing.stderr and "root" in listing.stderr
    tunetop("train", "--resume", run.id, check=True)


def test_another_users_lock_on_an_old_readable_run_does_not_block_its_resume(
    tmp_path: Path, victim: Path, intruder: tuple[int, int]
) -> None:
    run = finished_run(tmp_path)
    # As older versions left a run: folders 0755, files 0644.
    for path, mode in modes(state_root(victim)).items():
        os.chmod(path, 0o755 if mode & 0o100 else 0o644)
    holder = subprocess.Popen(
        setpriv(intruder, ["/usr/bin/python3", "-c", HOLD_LOCK, str(run.lock_file)]),
        stdout=subprocess.PIPE, text=True, env=intruder_env(None), cwd="/",
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not run.is_alive()  # a stranger's lock is no engine
        listed = json.loads(tunetop("ls", "--json", check=True).stdout.splitlines()[0])
        assert listed["alive"] is False
        resumed = tunetop("train", "--resume", run.id)
        assert resumed.returncode == 0, resumed.stderr
        assert "already has a live engine" not in resumed.stderr
        assert f"another user's process (pid {holder.pid} of user {INTRUDER}" in resumed.stderr
        warnings = [e["message"] for e in read_events(run.journal) if e["type"] == "warning"]
        assert any("lock was held by another user's process" in w and INTRUDER in w for w in warnings)
        # The run is private again: the stranger keeps only a lock on a file no longer in use.
        loose = {path: mode for path, mode in modes(state_root(victim)).items() if mode not in (0o700, 0o600)}
        assert not loose, loose
        assert as_user(intruder, ["cat", str(run.lock_file)]).returncode != 0
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_lock_held_by_a_leftover_process_is_named_and_a_live_engine_is_not_mistaken(tmp_path: Path) -> None:
    run = finished_run(tmp_path)
    dead_engine = run.engine_pid()
    leftover = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run.lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert leftover.stdout is not None and leftover.stdout.readline().strip() == "held"
        assert not run.is_alive()
        refused = tunetop("train", "--resume", run.id)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "already has a live engine" not in refused.stderr
        assert f"held by pid {leftover.pid} of user root" in refused.stderr
        assert f"pid {dead_engine}, is no longer running" in refused.stderr and f"kill {leftover.pid}" in refused.stderr
    finally:
        leftover.kill()
        leftover.wait(timeout=10)
    # A live engine is still reported as one.
    config = write_config(tmp_path / "long.toml", training={"iterations": 100_000, "steps_per_report": 2})
    live = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        assert live.is_alive()
        with pytest.raises(RunError, match=rf"already has a live engine \(pid {live.engine_pid()}\)"):
            RunLock(live).acquire()
    finally:
        os.kill(live.engine_pid() or 0, signal.SIGKILL)
        wait_for(lambda: not live.is_alive(), timeout=10)


def test_a_socket_folder_of_another_user_is_refused_in_a_sentence(
    tmp_path: Path, intruder: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    squatted = Path(tempfile.mkdtemp(prefix="tt-squat-", dir="/tmp"))
    try:
        os.chown(squatted, *intruder)
        monkeypatch.setenv("TUNETOP_SOCKET_DIR", str(squatted))
        config = write_config(tmp_path / "run.toml")
        started = tunetop("train", str(config), "--detach")
        assert started.returncode == 2 and "Traceback" not in started.stderr, started.stderr
        assert f"belongs to user {INTRUDER}" in started.stderr and "TUNETOP_SOCKET_DIR" in started.stderr
        assert list_runs() == []  # refused before a run was made
    finally:
        shutil.rmtree(squatted, ignore_errors=True)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("0.0.0.0", 0))
                port = first.getsockname()[1]
                second.bind(("0.0.0.0", port + 1))
                return int(port)
            except OSError:
                continue
    raise AssertionError("no free pair of ports")


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_non_loopback_listener_is_warned_about(tmp_path: Path, host: str) -> None:
    tunetop("keys", check=True)
    clients = Path(os.environ["XDG_CONFIG_HOME"]) / "tunetop" / "clients"
    clients.mkdir(parents=True)
    shutil.copy(Path(os.environ["XDG_CONFIG_HOME"]) / "tunetop" / "client.key", clients / "laptop.key")
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 2})
    started = tunetop("train", str(config), "--detach", "--listen", f"tcp://{host}:{_free_port_pair()}", check=True)
    run = resolve(started.stdout.strip())
    try:
        wait_for(lambda: any(e["type"] == "run_started" for e in read_events(run.journal)))
        journaled = [e["message"] for e in read_events(run.journal) if e["type"] == "warning"]
        if host == "127.0.0.1":
            assert "non-loopback" not in started.stderr and not any("non-loopback" in w for w in journaled)
            return
        assert "non-loopback address" in started.stderr and "1 authorized client key" in started.stderr
        assert any("non-loopback address" in w and "CURVE" in w for w in journaled)
    finally:
        os.kill(run.engine_pid() or 0, signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=10)


def test_a_client_will_not_talk_to_sockets_that_are_not_private(tmp_path: Path) -> None:
    """A socket in a folder others can enter (or another user's socket) may not be the engine's."""
    from tunetop.control.endpoints import SocketDirError, check_endpoint
    from tunetop.runs.client_sync import request

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    (loose / "run.cmd").touch()
    with pytest.raises(SocketDirError, match="not private"):
        check_endpoint(f"ipc://{loose}/run.cmd")
    with pytest.raises(SocketDirError, match="not private"):
        request(f"ipc://{loose}/run.cmd", "status", timeout=1)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    (private / "run.cmd").touch()
    check_endpoint(f"ipc://{private}/run.cmd")  # ours and private: fine
    if os.getuid() == 0:
        os.chown(private / "run.cmd", 65534, 65534)  # bound by someone else
        with pytest.raises(SocketDirError, match="belongs to"):
            check_endpoint(f"ipc://{private}/run.cmd")


def test_a_socket_folder_inside_another_users_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner of a parent folder could move the private socket folder aside and pose as the engine."""
    if os.getuid() != 0:
        pytest.skip("needs root to hand a folder to another user")
    from tunetop.control.endpoints import SocketDirError, socket_dir

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("TUNETOP_SOCKET_DIR", str(theirs / "sockets"))
    with pytest.raises(SocketDirError, match="pose as your runs' engines"):
        socket_dir()


def test_a_state_folder_of_another_user_is_refused(tmp_path: Path, intruder: tuple[int, int]) -> None:
    """A TUNETOP_HOME (or its queue/ or runs/) that another user made is not used: its owner could
    swap the queue file or a run's config at any moment, whatever mode it has now (an attacker got
    a queued notify.command run as the victim so)."""
    uid, gid = intruder
    home = tmp_path / "shared-home"
    (home / "queue").mkdir(parents=True)
    for folder in (home, home / "queue"):
        os.chown(folder, uid, gid)
        os.chmod(folder, 0o777)
    result = tunetop("queue", "pause", env={**os.environ, "TUNETOP_HOME": str(home)})
    assert result.returncode == 2, result.stderr
    assert f"cannot use {home}: it belongs to another user (uid {uid})" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "queue" / "queue.json").exists()
