"""The optional TCP listener, for those who must use TCP: CURVE-encrypted and key-authenticated.

``tunetop train CONFIG --listen tcp://ADDR:PORT`` publishes events on PORT and takes commands on
PORT+1, alongside the usual ipc sockets. Only clients whose public key is in the authorized
folder ($XDG_CONFIG_HOME/tunetop/clients/*.key, made with ``tunetop keys``) get anything; a
listener with no authorized keys is refused at start. The server's key pair is made per run
(RUN_DIR/curve/), and a client needs its public key (``server.key``). Loopback unless an
address says otherwise, and a non-loopback one is warned about (stderr and the journal). Uses
pyzmq's zmq.auth (ZAP). No mlx import here.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class CurveError(ValueError):
    """A TCP listener that cannot be set up safely; the message says how to fix it."""


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tunetop"


def clients_dir() -> Path:
    """Public keys of the clients allowed on TCP listeners."""
    return config_home() / "clients"


def client_key_files() -> tuple[Path, Path]:
    """This user's client key pair (public, secret), made by ``tunetop keys``."""
    return config_home() / "client.key", config_home() / "client.key_secret"


def make_client_keys() -> Path:
    """Create this user's client key pair if missing; return the public key file."""
    public, secret = client_key_files()
    if not secret.exists():
        config_home().mkdir(parents=True, exist_ok=True)
        made_public, made_secret = zmq.auth.create_certificates(str(config_home()), "client")
        os.chmod(made_secret, 0o600)
    return public


@dataclass
class CurveServer:
    """The TCP endpoints and this run's server key pair."""

    events: str
    commands: str
    public_key: bytes
    secret_key: bytes
    authorized: Path

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(self.authorized))
        return authenticator


def parse_listen(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"tcp://(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)", address)
    if not match:
        raise CurveError(f"--listen {address!r}: expected tcp://ADDR:PORT, for example tcp://127.0.0.1:5555.")
    host, port = match.group("host"), int(match.group("port"))
    if not 0 < port < 65535:
        raise CurveError(f"--listen {address!r}: the port must be between 1 and 65534 (PORT+1 takes commands).")
    return host, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_listen(address: str, authorized: Path | None = None) -> tuple[str, int, Path]:
    """Parse ``--listen`` and require authorized client keys; CurveError says what to do."""
    host, port = parse_listen(address)
    authorized = authorized or clients_dir()
    keys = sorted(authorized.glob("*.key")) if authorized.is_dir() else []
    if not keys:
        raise CurveError(
            f"--listen {address}: refused, no authorized client keys in {authorized}. A TCP listener "
            "without keys would let anyone who can reach the port watch and steer the run. Run "
            "`tunetop keys` on each client and copy its client.key into that folder (or use ssh: "
            "`tunetop attach user@host:RUN`, which needs no listener)."
        )
    return host, port, authorized


def exposure_warning(address: str, authorized: Path | None = None) -> str:
    """What to warn about a listener that is reachable from other machines ("" on loopback)."""
    host, port = parse_listen(address)
    if is_loopback(host):
        return ""
    authorized = authorized or clients_dir()
    keys = len(list(authorized.glob("*.key"))) if authorized.is_dir() else 0
    return (
        f"--listen {address} binds a non-loopback address: ports {port} (events) and {port + 1} (commands) "
        f"are open to every machine that can reach this one. Traffic is CURVE-encrypted and only the "
        f"{keys} authorized client key(s) in {authorized} get in, but anyone can probe the ports, and a "
        "copied client key gives full control of the run. Prefer ssh (`tunetop attach user@host:RUN`, "
        "no listener) or bind 127.0.0.1."
    )


def prepare(address: str, run_dir: Path, authorized: Path | None = None) -> CurveServer:
    """Check the listener and make (or reuse) the run's server keys; CurveError if unsafe."""
    host, port, authorized = check_listen(address, authorized)
    folder = run_dir / "curve"
    if not (folder / "server.key_secret").exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        zmq.auth.create_certificates(str(folder), "server")
        os.chmod(folder / "server.key_secret", 0o600)
    public, secret = zmq.auth.load_certificate(str(folder / "server.key_secret"))
    assert secret is not None
    return CurveServer(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", public, secret, authorized)


def client_options(server_public_key: bytes) -> dict[str, Any]:
    """Socket options for a client of a TCP listener, from this user's key pair."""
    public_file, secret_file = client_key_files()
    if not secret_file.exists():
        raise CurveError("no client key yet: run `tunetop keys`, then authorize the printed key on the server.")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    return {"curve_publickey": public, "curve_secretkey": secret, "curve_serverkey": server_public_key}
