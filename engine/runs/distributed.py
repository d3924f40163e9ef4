"""Data-parallel runs over several processes: mx.distributed for the math, ZeroMQ for control.

A distributed run is still one run. Rank 0 is the engine of :mod:`tunetop.runs.engine`: it owns
the run folder, the journal, the control plane, validation, samples and every file written.
The other ranks are *followers*: they load the same model and data, train on their block of
rows of every global batch, and do exactly what rank 0 tells them before each step ("step k
at learning rate x", or "stop"). So pause, resume, stop, save, evaluate and ``set`` reach all
ranks at the same step without the followers knowing about any of them.

Why a ZeroMQ channel beside mx.distributed: the ring backend busy-waits inside a collective,
so a follower parked in a broadcast while the run is paused would burn a core for hours; a
follower parked on a ZeroMQ socket sleeps. Collectives are used only inside the training step
(gradients, loss, token counts) and once at the start to copy rank 0's state to every rank.

When a rank dies, the next collective fails on every other rank ("connection to a peer was
lost"). Followers report that on the control channel and exit; rank 0 names the ranks that
did not report (or, when it started them itself, the ones whose process ended) in a
``rank_failed`` event and ends the run. Its last checkpoint resumes it, with any number of
ranks: the data order is global and the randomness of a step depends on (seed, step, rank).

Rank 0 (the engine) starts ranks 1..N-1 itself (:class:`Ranks`): as child processes for
``--np N``, over ssh for ``--hosts h1,h2,...`` (the first host is rank 0, this machine). It
watches those processes, so a rank that dies is named at once. mlx.launch is used only for the
mpi backend (:func:`mpi_launch_command`): it polls its children's stdin in a loop that keeps a
core busy for the whole run, and it cannot tell rank 0 which rank died.

Longer than most modules because it holds both sides of one protocol between ranks (rank
0's Coordinator and Ranks, the followers' loop); apart, the two would drift.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

BACKENDS = ("ring", "mpi", "nccl")
CONTROL_ENV = "TUNETOP_DIST_CONTROL"  # tcp://HOST:PORT of rank 0's control socket
STARTUP_SECONDS = 300.0  # followers load the model and data before they say hello
PEER_LOST = ("connection to a peer was lost", "closed by the peer", "nccl", "mpi")


class WorldError(RuntimeError):
    """The ranks of a distributed run could not start or went out of step."""


class RankLost(WorldError):
    """A rank is known to be gone (its process ended, or it reported a failed collective)."""


@dataclass
class Plan:
    """How many ranks, over which backend, started by whom."""

    size: int = 1
    backend: str = "ring"
    hosts: str = ""  # --hosts as given; empty: ``size`` ranks on this machine
    launched: bool = False  # True: mlx.launch started every rank; False: rank 0 starts the rest

    @property
    def distributed(self) -> bool:
        return self.size > 1 or self.launched or bool(self.hosts)

    def host_list(self) -> list[Host]:
        return parse_hosts(self.hosts) if self.hosts else [Host("127.0.0.1")] * self.size


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rank_from_env() -> int:
    """This process's rank as a launcher set it (mlx.launch, mpirun or :class:`Ranks`)."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception from a step means another rank went away."""
    if isinstance(error, RankLost):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in PEER_LOST)


def init_group(backend: str) -> Any:
    """Join the process group (every rank must call this; it waits for all of them)."""
    import mlx.core as mx

    use_hostfile_env()
    group = mx.distributed.init(strict=True, backend=backend)
    return group


# -- starting ranks ------------------------------------------------------------------------


LOOPBACK = ("127.0.0.1", "localhost", "::1")
FORWARDED_ENV = ("TUNETOP_CACHE", "TUNETOP_BLAS", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")
"""Environment a follower started over ssh gets from rank 0 (where they are set)."""


@dataclass(frozen=True)
class Host:
    """One entry of ``--hosts``: ``[user@]address[:ssh_port]``; ``address`` is what the ring uses."""

    address: str
    user: str = ""
    ssh_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Host:
        user, _, rest = text.rpartition("@")
        address, _, port = rest.partition(":")
        if not address or (port and not port.isdigit()):
            raise WorldError(f"--hosts entry {text!r} is not [user@]address[:ssh_port]")
        return cls(address, user, int(port) if port else None)

    @property
    def here(self) -> bool:
        """Started as a child process, no ssh: a loopback address with no user or port."""
        return self.address in LOOPBACK and not self.user and self.ssh_port is None

    @property
    def loopback(self) -> bool:
        return self.address in LOOPBACK

    def ip(self) -> str:
        """The ring backend wants IP addresses, not names."""
        try:
            return socket.gethostbyname(self.address)
        except OSError as error:
            raise WorldError(f"--hosts: cannot resolve {self.address!r}: {error}") from None


def parse_hosts(text: str) -> list[Host]:
    hosts = [Host.parse(part.strip()) for part in text.split(",") if part.strip()]
    if len(hosts) < 2:
        raise WorldError("--hosts needs at least two hosts, comma-separated (the first is this machine, rank 0)")
    return hosts


def _ssh_prefix(host: Host) -> list[str]:
    """ssh as remote attach uses it (tunetop.runs.ssh)."""
    from tunetop.runs.ssh import ssh_command

    return ssh_command(f"{host.user}@{host.address}" if host.user else host.address, host.ssh_port)


@dataclass
class Ranks:
    """Ranks 1..N-1 of a run, started by rank 0: child processes here, or over ssh on other hosts."""

    size: int
    backend: str
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def start(cls, run_path: Path, hosts: list[Host], backend: str) -> Ranks:
        """Start the followers and point this process (rank 0, ``hosts[0]``) at the same world."""
        import shlex

        from tunetop.runs.daemon import child_environment

        if backend not in ("ring", "nccl"):
            raise WorldError(f"tunetop starts ranks with the ring or nccl backend, not {backend!r}; for mpi, "
                             "start them with mlx.launch --backend mpi (README, 'Distributed runs').")
        size = len(hosts)
        everywhere: dict[str, str] = {"MLX_WORLD_SIZE": str(size)}
        base_port = int(os.environ.get("TUNETOP_RING_PORT", "32323"))
        # A port is probed free only where we can probe: on this machine.
        ports = [free_port() if h.loopback or i == 0 else base_port + i for i, h in enumerate(hosts)]
        everywhere[CONTROL_ENV] = f"tcp://{hosts[0].ip()}:{free_port()}"
        if backend == "ring":
            everywhere[HOSTFILE_ENV] = json.dumps([[f"{h.ip()}:{port}"] for h, port in zip(hosts, ports, strict=True)])
        else:
            everywhere["NCCL_HOST_IP"] = hosts[0].ip()
            everywhere["NCCL_PORT"] = str(free_port())
        # Ranks on one machine share its cores: more BLAS threads than cores slows every rank.
        on_this_machine = sum(1 for h in hosts if h.loopback)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, on_this_machine)))
        local_env = child_environment({**os.environ, **everywhere})
        local_env.setdefault("OPENBLAS_NUM_THREADS", threads)
        from tunetop.runs.ssh import remote_tunetop

        remote_command = remote_tunetop()
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ranks = cls(size, backend)
        # NCCL: one GPU per rank on this machine, as mlx.launch does (CUDA_VISIBLE_DEVICES per rank),
        # taken from the devices the user made visible, if any.
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        gpus = visible or [str(i) for i in range(size)]
        local_gpu = {rank: gpus[i % len(gpus)] for i, rank in enumerate(r for r, h in enumerate(hosts) if h.here or r == 0)}
        for rank, host in enumerate(hosts[1:], start=1):
            follower_args = ["_follower", "--backend", backend]
            if host.here:
                argv = [sys.executable, "-m", "tunetop.cli", *follower_args]
                gpu = {"CUDA_VISIBLE_DEVICES": local_gpu[rank]} if backend == "nccl" else {}
                env: dict[str, str] | None = {**local_env, "MLX_RANK": str(rank), **gpu}
            else:
                exports = {**forwarded, **everywhere, "MLX_RANK": str(rank), "PYTHONUNBUFFERED": "1"}
                if host.loopback:
                    exports.setdefault("OPENBLAS_NUM_THREADS", threads)
                remote = ["env", *(f"{k}={v}" for k, v in exports.items()), *remote_command, *follower_args]
                argv = [*_ssh_prefix(host), shlex.join(remote)]
                env = None
            log = os.fdopen(os.open(run_path / f"rank{rank}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")  # handed to the child
            ranks.processes[rank] = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches rank 0 only; it stops the others in step
                cwd=str(run_path),
            )
            log.close()
        os.environ.update(everywhere)
        os.environ["MLX_RANK"] = "0"
        if backend == "nccl":  # before this process first touches CUDA (the model loads later)
            os.environ["CUDA_VISIBLE_DEVICES"] = local_gpu[0]
        use_hostfile_env()
        return ranks

    def exited(self) -> dict[int, int]:
        """Ranks whose process (or ssh session) has ended, with exit codes."""
        return {rank: code for rank, p in self.processes.items() if (code := p.poll()) is not None}

    def finish(self, grace: float = 10.0) -> None:
        """Wait for followers told to stop; end those that do not within ``grace`` seconds."""
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


HOSTFILE_ENV = "TUNETOP_RING_HOSTS"  # the ring's hostfile as JSON text: followers on other hosts get it by env


def use_hostfile_env() -> None:
    """MLX reads the ring's hosts from a file: write the JSON we were given to one."""
    text = os.environ.get(HOSTFILE_ENV)
    if not text or (text in _hostfiles and _hostfiles[text] == os.environ.get("MLX_HOSTFILE")):
        return  # nothing given, or written already
    import atexit
    import tempfile

    handle, path = tempfile.mkstemp(prefix="tunetop-ring-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    _hostfiles[text] = path
    os.environ["MLX_HOSTFILE"] = path


_hostfiles: dict[str, str] = {}  # hostfile JSON -> the file written for it in this process


def mpi_launch_command(run_path: Path, hosts: list[Host], extra: list[str]) -> list[str]:
    """The ``mlx.launch --backend mpi`` command line that runs this run over ``hosts`` (rank 0 here).

    Every host needs tunetop, the model and the data at the same paths; only rank 0 writes.
    """
    from tunetop.runs.daemon import source_root

    control = f"tcp://{hosts[0].ip()}:{free_port()}"
    launcher = str(Path(sys.executable).with_name("mlx.launch"))
    return [
        launcher,
        "--backend", "mpi",
        "--hosts", ",".join(h.address for h in hosts),
        "--env", f"{CONTROL_ENV}={control}",
        "--env", "PYTHONUNBUFFERED=1",
        # tunetop at the same path on every host: installed in the same Python, or this source view
        *(["--env", f"PYTHONPATH={root}"] if (root := source_root()) else []),
        "--cwd", str(run_path),
        "--",
        sys.executable, "-m", "tunetop.cli", "_engine", str(run_path), "--launched", "--backend", "mpi",
        *extra,
    ]


# -- the control channel -------------------------------------------------------------------


def _pack(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


class Coordinator:
    """Rank 0's end of the control channel: hello from every follower, then step / stop orders."""

    def __init__(self, size: int, local: Ranks | None = None) -> None:
        self.size = size
        self.local = local
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished follower raises
        address = os.environ.get(CONTROL_ENV, "")
        if not address.startswith("tcp://") or ":" not in address[6:]:
            raise WorldError(f"{CONTROL_ENV} must be tcp://HOST:PORT for a distributed run, not {address!r}")
        port = address.rsplit(":", 1)[1]
        host = address[6:].rsplit(":", 1)[0]
        bind_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "*"
        self.socket.bind(f"tcp://{bind_host}:{port}")
        self.followers: dict[int, bytes] = {}
        self.reports: dict[int, str] = {}

    def wait_for_followers(self, timeout: float = STARTUP_SECONDS) -> None:
        """Block until ranks 1..N-1 said hello; fail naming a rank that died or never came."""
        deadline = time.monotonic() + timeout
        while len(self.followers) < self.size - 1:
            if self.local is not None and (gone := self.local.exited()):
                rank, code = sorted(gone.items())[0]
                raise WorldError(f"rank {rank} exited with code {code} before it started; see rank{rank}.log in the run folder")
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.size)) - set(self.followers))
                raise WorldError(f"ranks {missing} did not connect within {timeout:.0f} s")
            self._receive(timeout=0.2)

    def _receive(self, timeout: float) -> None:
        if not self.socket.poll(int(timeout * 1000)):
            return
        identity, payload = self.socket.recv_multipart()
        try:
            message = json.loads(payload)
            rank = int(message["rank"])
        except (ValueError, KeyError, TypeError):
            return  # not one of ours
        if message.get("op") == "hello":
            self.followers[rank] = identity
        elif message.get("op") == "failed":
            self.reports[rank] = str(message.get("error", ""))

    def check(self) -> None:
        """Raise :class:`RankLost` when a follower is known to be gone (between steps, while paused)."""
        if self.local is not None and (gone := self.local.exited()):
            rank, code = sorted(gone.items())[0]
            raise RankLost(f"rank {rank} exited with code {code}")
        self._receive(timeout=0)
        if self.reports:
            rank, error = sorted(self.reports.items())[0]
            raise RankLost(f"rank {rank} failed: {error}")

    def send(self, message: dict[str, Any]) -> None:
        """The same order to every follower."""
        data = _pack(message)
        for identity in self.followers.values():
            # A gone follower shows up as a failed collective; the caller names it.
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart([identity, data])

    def setup(self, config_text: str, source: str) -> None:
        """The run's config (followers build the same trainer from it)."""
        self.send({"op": "setup", "config": config_text, "source": source})

    def step(self, iteration: int, learning_rate: float, memory_limit_gb: float = 0.0) -> None:
        """Tell every follower to take this step, at this rate, under this memory cap (live values)."""
        self.send({"op": "step", "iteration": iteration, "learning_rate": learning_rate, "memory_limit_gb": memory_limit_gb})

    def share_state(self, trainer: Any) -> None:
        """Rank 0's weights, optimizer state and position, on every rank."""
        counters = {
            "iteration": trainer.iteration,
            "trained_tokens": trainer.trained_tokens,
            "epoch": trainer.epoch,
            "position": trainer.position,
            "learning_rate_override": trainer.learning_rate_override,
        }
        keys = sorted(_state_arrays(trainer))
        self.send({"op": "state", "counters": counters, "keys": keys})
        _broadcast_state(trainer, root=True)

    def lost_ranks(self, wait: float = 3.0) -> list[int]:
        """After a failed collective: the ranks that died (did not report the failure themselves)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and len(self.reports) < len(self.followers):
            self._receive(timeout=0.1)
        if self.local is not None:
            silent = [rank for rank in self.local.exited() if rank not in self.reports]
        else:
            silent = [rank for rank in self.followers if rank not in self.reports]
        # Nobody silent: the failure began on a rank that reported it (an error of its own).
        return sorted(silent or self.reports)

    def close(self) -> None:
        """Tell every follower to stop, and wait for the ones rank 0 started."""
        self.send({"op": "stop"})
        if self.local is not None:
            self.local.finish()
        self.socket.close()
        self.context.term()


class Follower:
    """A follower's end of the control channel; notices when rank 0 goes away."""

    def __init__(self, rank: int) -> None:
        address = os.environ.get(CONTROL_ENV, "")
        if not address:
            raise WorldError(f"{CONTROL_ENV} is not set: followers are started by rank 0 or by mlx.launch")
        self.rank = rank
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        # Heartbeats turn a rank 0 whose machine vanished into a disconnect within ~10 s.
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)
        self.socket.send(_pack({"op": "hello", "rank": rank}))

    def receive(self) -> dict[str, Any]:
        """The next order; raises :class:`WorldError` when rank 0 disconnects."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.socket in ready:
                message: dict[str, Any] = json.loads(self.socket.recv())
                return message
            if self.monitor in ready:
                self.monitor.recv_multipart()
                raise WorldError("rank 0 went away")

    def report_failure(self, error: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send(_pack({"op": "failed", "rank": self.rank, "error": error}), zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()
        self.context.term()


# -- state copies ----------------------------------------------------------------------------


def _state_arrays(trainer: Any) -> dict[str, Any]:
    """Trainable weights and optimizer state, flattened, keys prefixed by which they are."""
    from mlx.utils import tree_flatten

    trainer.optimizer.init(trainer.model.trainable_parameters())  # followers have not stepped yet
    weights: list[tuple[str, Any]] = tree_flatten(trainer.model.trainable_parameters())  # type: ignore[assignment]
    optimizer: list[tuple[str, Any]] = tree_flatten(trainer.optimizer.state)  # type: ignore[assignment]
    arrays = {f"weights/{k}": v for k, v in weights}
    arrays.update({f"optimizer/{k}": v for k, v in optimizer})
    return arrays


def _broadcast_state(trainer: Any, root: bool) -> None:
    """Every rank ends with rank 0's arrays (a sum where the other ranks add zeros)."""
    import mlx.core as mx

    if trainer.shard is None:  # a world of one: nothing to share
        return
    arrays = _state_arrays(trainer)
    group = trainer.shard.group
    shared = {
        key: mx.distributed.all_sum(value if root else mx.zeros_like(value), group=group)
        for key, value in sorted(arrays.items())
    }
    mx.eval(shared)
    if root:
        return
    weights = {k.removeprefix("weights/"): v for k, v in shared.items() if k.startswith("weights/")}
    optimizer = {k.removeprefix("optimizer/"): v for k, v in shared.items() if k.startswith("optimizer/")}
    trainer.install(weights, optimizer)


def follow(backend: str) -> int:
    """A follower's life: join, build the trainer rank 0 describes, then step until told to stop.

    Exit codes: 0 when rank 0 said stop, 1 when the world broke (a rank died, rank 0 vanished).
    """
    from tunetop.training import config as config_module
    from tunetop.training.trainer import Shard

    rank = rank_from_env()
    group = init_group(backend)
    channel = Follower(group.rank() if group.size() > 1 else rank)
    print(f"rank {channel.rank} of {group.size()} joined", flush=True)
    try:
        setup = channel.receive()
        if setup.get("op") != "setup":
            return 0  # rank 0 ended before the run began
        from tunetop.training.build import build_trainer

        cfg = config_module.parse(setup["config"], source=setup["source"])
        scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"tunetop-rank{channel.rank}-{os.getpid()}"
        trainer, *_ = build_trainer(cfg, scratch, shard=Shard(group, group.rank(), group.size()))
        state = channel.receive()
        if state.get("op") != "state":
            return 0
        mine = sorted(_state_arrays(trainer))
        if mine != state["keys"]:
            raise WorldError("this rank's model has other trainable weights than rank 0's: every host needs the "
                             "same model, LoRA settings and tunetop version")
        _broadcast_state(trainer, root=False)
        counters = state["counters"]
        trainer.set_counters(counters["iteration"], counters["trained_tokens"], counters["epoch"],
                             counters["position"], counters["learning_rate_override"])
        while True:
            order = channel.receive()
            if order.get("op") != "step":
                print(f"rank {channel.rank}: stop at iteration {trainer.iteration}", flush=True)
                return 0
            if order["iteration"] != trainer.iteration:
                raise WorldError(f"out of step: rank 0 is at iteration {order['iteration']}, this rank at {trainer.iteration}")
            trainer.apply_live("learning_rate", float(order["learning_rate"]))  # rank 0's rate for this step
            cap = float(order.get("memory_limit_gb", trainer.parameters.memory_limit_gb))
            if cap != trainer.parameters.memory_limit_gb:  # a live `set memory_limit_gb` on rank 0
                trainer.apply_live("memory_limit_gb", cap)
                print(f"rank {channel.rank}: memory_limit_gb = {cap:g} from iteration {trainer.iteration}", flush=True)
            trainer.step()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        print(f"rank {channel.rank}: {message}", file=sys.stderr, flush=True)
        channel.report_failure(message)
        return 1
    finally:
        channel.close()
