"""Remote attach through a real sshd on localhost: tunnel, drop, reconnect, and every error."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.client_sync import send_command
from engine.journal import read_events
from engine.runs import RunDir
from tests import sshd
from tests.conftest import ROOT, tunetop, wait_for
from tui.app import TunetopApp
from tui.remote import RemoteAttachment, RemoteError, parse_target, remote_info
from tui.screens.dashboard import DashboardScreen

pytestmark = pytest.mark.skipif(sshd.available() is not None, reason=str(sshd.available()))


@pytest.fixture
def ssh_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sshd.SshServer]:
    server = sshd.start(tmp_path / "ssh")
    monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {server.client_config}")
    monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", sshd.remote_tunetop_command(dict(os.environ), ROOT))
    yield server
    server.stop()


def test_parse_targets() -> None:
    assert parse_target("alice@gpu1:2222:run-1") == parse_target("alice@gpu1:2222:run-1")
    t = parse_target("alice@gpu1:2222:run-1")
    assert (t.user, t.host, t.port, t.run) == ("alice", "gpu1", 2222, "run-1")
    t = parse_target("gpu1:my-run")
    assert (t.user, t.host, t.port, t.run) == ("", "gpu1", None, "my-run")
    assert parse_target("gpu1:", with_run=True).run == ""
    assert parse_target("bob@gpu1:2200", with_run=False).port == 2200
    with pytest.raises(RemoteError, match="is not user@host"):
        parse_target("a:b:c:d")


async def test_attach_over_ssh_survives_a_dropped_tunnel(ssh_server: sshd.SshServer, engine_run: RunDir) -> None:
    wait_for(lambda: send_command(engine_run, "status").result["iteration"] >= 4)
    remote = RemoteAttachment.open(f"{ssh_server.destination}:{engine_run.id}")
    assert remote.alive and remote.tunnel is not None and remote.tunnel.alive()
    app = TunetopApp(None, remote=remote, remember=False)
    try:
        async with app.run_test(size=(160, 45)) as pilot:
            screen = app.screen
            assert isinstance(screen, DashboardScreen)
            for _ in range(600):
                if screen.run_state.iteration >= 6:
                    break
                await pilot.pause(0.05)
            before = screen.run_state.last_seq
            assert before > 0
            # the network drops: kill the ssh process under the TUI
            assert remote.tunnel.process is not None
            os.kill(remote.tunnel.process.pid, signal.SIGKILL)
            for _ in range(600):
                if remote.tunnel.restarts >= 1 and screen.run_state.last_seq > before + 3:
                    break
                await pilot.pause(0.05)
            assert remote.tunnel.restarts >= 1
            # the history held is gap-free and complete: every journaled event exactly once
            state = screen.run_state
            journal = [e["seq"] for e in read_events(engine_run.journal)]
            assert state.events_applied == state.last_seq
            assert journal[: state.last_seq] == list(range(1, state.last_seq + 1))
            # and it steers the run through the tunnel
            await pilot.press("p")
            for _ in range(600):
                if state.state == "paused":
                    break
                await pilot.pause(0.05)
            assert send_command(engine_run, "status").result["state"] == "paused"
            await pilot.press("q")
    finally:
        remote.close()
    assert engine_run.is_alive()  # the run never noticed


def test_ls_over_ssh(ssh_server: sshd.SshServer, engine_run: RunDir) -> None:
    result = tunetop("ls", f"{ssh_server.user}@127.0.0.1:{ssh_server.port}", check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("RUN") and any(line.startswith(engine_run.id) for line in lines[1:])


def test_errors_are_explained(ssh_server: sshd.SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # run not found
    with pytest.raises(RemoteError, match="no runs? (yet|matches)"):
        remote_info(parse_target(f"{ssh_server.destination}:no-such-run"))
    # host unreachable: nothing listens on this port
    with pytest.raises(RemoteError, match="cannot reach"):
        remote_info(parse_target(f"127.0.0.1:{sshd.free_port()}:x"))
    # authentication refused: a key the server does not know
    other = tmp_path / "other_key"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {other}")
    config = tmp_path / "other_config"
    config.write_text(ssh_server.client_config.read_text().replace(str(ssh_server.folder / "client_key"), str(other)))
    monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {config}")
    with pytest.raises(RemoteError, match="authentication failed"):
        remote_info(parse_target(f"{ssh_server.destination}:x"))
    monkeypatch.setenv("TUNETOP_SSH", f"ssh -F {ssh_server.client_config}")
    # tunetop missing on the remote side
    monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", "no-such-tunetop-binary")
    with pytest.raises(RemoteError, match="tunetop is not installed"):
        remote_info(parse_target(f"{ssh_server.destination}:x"))
    # another protocol version on the remote side
    other_version = tmp_path / "tunetop-v99"
    other_version.write_text("#!/bin/sh\necho '{\"protocol\": 99, \"run\": \"x\"}'\n")
    other_version.chmod(0o755)
    monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", str(other_version))
    with pytest.raises(RemoteError, match="speaks protocol 99"):
        remote_info(parse_target(f"{ssh_server.destination}:x"))
    # and through the CLI: exit 3, one line, no traceback
    monkeypatch.setenv("TUNETOP_REMOTE_TUNETOP", "no-such-tunetop-binary")
    result = tunetop("attach", f"{ssh_server.destination}:x")
    assert result.returncode == 3 and "tunetop is not installed" in result.stderr and "Traceback" not in result.stderr


def _curve_socket(kind: int, endpoint: str, options: dict) -> Any:
    import zmq

    socket = zmq.Context.instance().socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        setattr(socket, name, value)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    return socket


def test_tcp_listener_needs_keys_and_delivers_only_to_authorized_clients(tmp_path: Path) -> None:
    import json

    import zmq
    import zmq.auth

    from engine.curve import client_options, clients_dir, make_client_keys
    from engine.runs import list_runs, resolve
    from tests.conftest import write_config

    port = sshd.free_port()
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 1})
    refused = tunetop("train", str(config), "--detach", "--listen", f"tcp://127.0.0.1:{port}")
    assert refused.returncode == 2 and "no authorized client keys" in refused.stderr
    assert list_runs() == []  # refused before anything was created

    public = make_client_keys()
    clients_dir().mkdir(parents=True, exist_ok=True)
    (clients_dir() / "me.key").write_text(public.read_text())
    run = resolve(tunetop("train", str(config), "--detach", "--listen", f"tcp://127.0.0.1:{port}", check=True).stdout.strip())
    try:
        info = json.loads(run.endpoints_file.read_text())
        server_key = info["server_key"].encode()
        good = _curve_socket(zmq.SUB, info["tcp_events"], client_options(server_key))
        assert good.poll(10_000), "an authorized client receives events"
        assert json.loads(good.recv_multipart()[-1])["run"] == run.id
        dealer = _curve_socket(zmq.DEALER, info["tcp_commands"], client_options(server_key))
        dealer.send(b'{"v":1,"id":"s","cmd":"status","args":{}}')
        assert dealer.poll(10_000) and json.loads(dealer.recv_multipart()[-1])["ok"]
        # a client with a key the engine does not know gets nothing at all
        stranger = zmq.auth.create_certificates(str(tmp_path), "stranger")[1]
        spub, ssecret = zmq.auth.load_certificate(stranger)
        wrong = {"curve_publickey": spub, "curve_secretkey": ssecret, "curve_serverkey": server_key}
        bad_sub = _curve_socket(zmq.SUB, info["tcp_events"], wrong)
        bad_dealer = _curve_socket(zmq.DEALER, info["tcp_commands"], wrong)
        bad_dealer.send(b'{"v":1,"id":"s","cmd":"status","args":{}}')
        assert not bad_sub.poll(4000) and not bad_dealer.poll(1000)
        # and a plain-text client (no CURVE) gets nothing either
        plain = _curve_socket(zmq.SUB, info["tcp_events"], {})
        assert not plain.poll(3000)
        for socket in (good, dealer, bad_sub, bad_dealer, plain):
            socket.close(0)
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)
