"""A real OpenSSH server on 127.0.0.1 for the remote-attach tests, with a key made for the test."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class SshServer:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]
    client_config: Path
    user: str

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def available() -> str | None:
    """None when a test sshd can run here, else why not."""
    if not Path(SSHD).exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "openssh-server / openssh-client not installed (bash .ci/setup installs them)"
    return None


def start(folder: Path) -> SshServer:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    os.chmod(folder / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    # A port probed free can be taken before sshd binds it (by another worker's server): then
    # sshd exits at once, and another port is tried.
    for _attempt in range(5):
        port = free_port()
        process = _start_sshd(folder, port)
        if process is not None:
            break
    else:
        raise RuntimeError("sshd exited: " + (folder / "sshd.log").read_text())
    client = folder / "ssh_config"
    client.write_text(
        "\n".join(
            [
                "Host 127.0.0.1",
                f"  IdentityFile {folder / 'client_key'}",
                "  IdentitiesOnly yes",
                "  StrictHostKeyChecking no",
                "  UserKnownHostsFile /dev/null",
                "  LogLevel ERROR",
            ]
        )
        + "\n"
    )
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    return SshServer(folder, port, process, client, user)


def _start_sshd(folder: Path, port: int) -> subprocess.Popen[bytes] | None:
    """sshd on ``port``, once it accepts connections; None if it exited (the port was taken)."""
    config = folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {folder / 'host_key'}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                f"PidFile {folder / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "AllowStreamLocalForwarding yes",
                "StreamLocalBindUnlink yes",
                "LogLevel ERROR",
            ]
        )
        + "\n"
    )
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(folder / "sshd.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 60  # a busy machine
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError("sshd did not accept connections in 60 s: " + (folder / "sshd.log").read_text())


def remote_tunetop_command(env: dict[str, str], root: Path) -> str:
    """The 'tunetop' the remote side runs: this checkout, with the test's state folders."""
    # TUNETOP_TEST_OWNER: sshd gives a session a fresh environment; what it starts is the test's too.
    names = ("TUNETOP_HOME", "TUNETOP_CACHE", "TUNETOP_SOCKET_DIR", "XDG_CONFIG_HOME", "TUNETOP_TEST_OWNER")
    exports = " ".join(f"{name}={shlex.quote(env[name])}" for name in names if name in env)
    return f"env {exports} PYTHONPATH={shlex.quote(str(root))} {shlex.quote(sys.executable)} -m engine.cli"
