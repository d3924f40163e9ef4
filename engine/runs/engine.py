"""One engine process owning one run: set-up from the config, the loop, commands, shutdown.

``Engine.run()`` loads the model, tokenizer and data named by the config, applies LoRA, and
drives :func:`tunetop.training.trainer.run_loop`. Every progress event becomes a journaled protocol event.
Commands arrive on a thread-safe queue (filled by the ZeroMQ server thread) and are applied
between steps by the loop's control hook, so training never waits on a client. A write that
fails (a full disk) pauses the run; what could not be written waits in memory and is written,
and the run resumed, when there is room again (tunetop.runs.write_trouble).

Longer than most modules because Engine is one state machine: its events and status, the
writes that fail, the command queue and the loop's hooks all read and change the same state
(paused, stopping, the trouble held). What it builds and samples with lives in training.build
and training.sampling; the sockets live in control.server.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tunetop.control.endpoints import SocketError
from tunetop.control.events import EventLog
from tunetop.control.journal import JournalWriter
from tunetop.control.protocol import Command, Reply
from tunetop.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED
from tunetop.runs.folders import RunDir, RunError, RunLock
from tunetop.runs.labels import fold_labels, status_labels
from tunetop.runs.write_trouble import ROOM_BYTES, WriteTrouble, free_bytes, reason
from tunetop.training import config as config_module
from tunetop.training.build import ModelError, build_trainer
from tunetop.training.config import ConfigError, RunConfig
from tunetop.training.data import DataError
from tunetop.training.sampling import SampleError, SampleInterrupted, sample

if TYPE_CHECKING:  # names for the type checker: these modules import mlx, which this one does on first use only
    from tunetop.interop.tensorboard import TensorBoardWriter
    from tunetop.interop.trackers import Tracker
    from tunetop.runs.distributed import Coordinator, Plan
    from tunetop.runs.machine import SystemMonitor
    from tunetop.runs.notify import CommandNotifier
    from tunetop.training.run_warnings import WarningSink
    from tunetop.training.trainer import Disposition, NonFinite, Progress, Shard, Trainer

HEAVY_COMMANDS = ("sample", "evaluate")
"""Commands that run the model: one per step boundary while training, so a queue of them cannot hold the loop."""
QUICK_COMMANDS = ("pause", "resume", "stop", "set", "tag", "note")
"""Commands applied as soon as they are seen, even between the tokens of a sample."""
MAX_WAITING_HEAVY = 32
"""Samples and evaluations that may wait their turn; more are refused with a 'busy' reply."""
MAX_WAITING_HEAVY_PER_CLIENT = 8
"""Of those, what one client (one connection) may have waiting: one client cannot fill the queue."""


@dataclass
class PendingCommand:
    """A command waiting for the loop, and how to answer it."""

    command: Command
    respond: Callable[[Reply], None]
    client: bytes = b""
    """The connection that sent it (the server's routing id): its waiting samples go when it does."""


@dataclass
class ControlState:
    paused: bool = False
    stop_reason: str = ""
    exit_code: int = EXIT_OK


def nonfinite_message(event: NonFinite) -> str:
    """What an unusable step (``trainer.NonFinite``) was and what happens next, in a sentence or two."""
    where = f"at iteration {event.iteration} (epoch {event.epoch}, batch {event.batch})"
    cause = {
        "loss": f"the loss is {event.loss} {where}",
        "gradients": f"the gradients hold NaN or infinity {where} (loss {event.loss:.4f})",
        "update": f"the update {where} would make the weights NaN or infinite (loss {event.loss:.4f}); "
        "the learning rate is likely too high",
    }.get(event.cause, f"step {where} is not finite")
    if event.action == "skipped":
        return f"{cause}: the batch was skipped and its update undone."
    undone = "its update was undone, the weights are those before this batch"
    if event.action == "stop":
        return f"{cause}: {undone}; the run stops (training.on_nonfinite = \"stop\")."
    if event.streak > 1:
        return (
            f"{cause}: {event.streak} steps in a row could not be used, so skipping cannot recover; {undone}. "
            "The run is paused: lower the learning rate (`tunetop set learning_rate=...`) and resume, or stop it."
        )
    return (
        f"{cause}: {undone}. The run is paused (training.on_nonfinite = \"pause\"): resume to go on, "
        "perhaps with a lower learning rate (`tunetop set learning_rate=...`), or stop it."
    )


class Engine:
    """Runs one training run to its end, publishing events and taking commands."""

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        echo: Callable[[dict[str, Any], bytes], None] | None = None,
        resume: bool = False,
        resume_from: int | None = None,
        plan: Plan | None = None,
    ):
        self.plan = plan  # distributed.Plan: how many ranks; None or size 1 = one process
        self.world: Coordinator | None = None  # once the ranks have joined
        self.resume = resume
        self.resume_from = resume_from
        self.cfg = cfg
        self.run_dir = run
        self.commands: queue.Queue[PendingCommand] = queue.Queue()
        self.control = ControlState()
        self.lock = RunLock(run)
        self.events: EventLog | None = None
        self.echo = echo
        self.trainer: Trainer | None = None
        self.state = ""
        # The pid tells a starter waiting on status.json that this engine, not an earlier one, wrote it.
        self._status: dict[str, Any] = {"name": cfg.name, "iterations": cfg.training.iterations, "pid": os.getpid()}
        if resume:  # until the checkpoint is restored, `ls` keeps showing where the run stood
            previous = run.status()
            kept = ("iteration", "loss", "val_loss", "best_val_loss", "best_val_iteration", "trained")
            self._status.update({k: previous[k] for k in kept if k in previous})
        self.on_ready: list[Callable[[Engine], Any]] = []
        self.on_close: list[Callable[[Engine], Any]] = []
        self._sampled_at = -1
        self._first_iteration: int | None = None  # where this engine's loop began
        self.trouble: WriteTrouble | None = None  # writes that failed; the run is paused until they succeed
        self._status_dirty = False  # status.json could not be written
        self._digest_dirty = False  # nor the history digest
        self._unsaved: int | None = None  # the iteration of a save that failed
        self._save_bytes = 0
        self._tensorboard: TensorBoardWriter | None = None
        self._trackers: list[Tracker] = []  # W&B, SwanLab
        # Commands taken off the queue but not applied yet (the loop's thread only): heavy ones wait
        # for their step boundary while quick ones that came later are applied.
        self._waiting: collections.deque[PendingCommand] = collections.deque()
        self._heavy_waiting = 0
        self._gone_clients: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        # Fault injection for tests: seconds to wait at each of a sample's checks, so that a sample
        # lasts long enough on the tiny embedded model for a pause, stop or signal to land inside it.
        self._slow_sample = float(os.environ.get("TUNETOP_FAULT_SLOW_SAMPLE") or 0)
        self._server_failure = ""  # set by the server thread as it ends; read by the loop
        self._warnings: WarningSink | None = None  # while the run is active
        self._notifier: CommandNotifier | None = None  # when the config has notify.command
        self._monitor: SystemMonitor | None = None  # while the loop runs (metrics.system_seconds)

    # -- events --------------------------------------------------------------------------

    @property
    def _trainer(self) -> Trainer:
        """The trainer, where only a built run gets (commands between steps, samples, saves)."""
        assert self.trainer is not None, "the run has no trainer yet"
        return self.trainer

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        assert self.events is not None
        if type_ == "finished" and self._warnings is not None:
            self._warnings.flush()  # the totals of repeated warnings come before the end
        event = self.events.emit(type_, **fields)
        self._update_status(event)
        if type_ == "save":  # a crash later costs a reader only the events since this save
            self._write_digest()
        return event

    def _write_digest(self) -> bool:
        assert self.events is not None
        try:
            self.events.write_digest()
        except OSError as error:
            self._digest_dirty = True
            if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a cache, but a full disk is everyone's trouble
                self._write_failed("history.ttj", error)
            return False
        self._digest_dirty = False
        return True

    def _update_status(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        status = self._status
        if kind == "train":
            status.update(iteration=event["iteration"], loss=event["loss"])
        elif kind == "validation":
            status.update(iteration=event["iteration"], val_loss=event["loss"])
            best = status.get("best_val_loss")
            if isinstance(event["loss"], (int, float)) and (not isinstance(best, (int, float)) or event["loss"] < best):
                status.update(best_val_loss=event["loss"], best_val_iteration=event["iteration"])
        elif kind == "tags":
            status.update(tags=event["tags"])
        elif kind == "note":
            status.update(note=event["text"])
        elif kind == "state":
            status.update(state=event["state"])
        elif kind in ("save", "resumed"):  # a resume goes back to its checkpoint's iteration
            status.update(iteration=event["iteration"])
        elif kind == "finished":
            # The last steps may not have reached a report (steps_per_report), so `ls` would lag.
            status.update(reason=event["reason"], iteration=event["iteration"])
        else:
            return
        status["updated"] = event["ts"]
        status["seq"] = event["seq"]
        self._write_status()

    def _write_status(self) -> bool:
        try:
            self.run_dir.write_status(self._status)
        except OSError as error:
            self._status_dirty = True
            self._write_failed(self.run_dir.status_file.name, error)
            return False
        self._status_dirty = False
        return True

    # -- writes that fail ----------------------------------------------------------------

    @property
    def notice(self) -> str:
        """While writes fail: what failed and what the engine does about it ("" otherwise).

        Published in heartbeats and ``status`` replies, since the journal may not hold it yet."""
        trouble = self.trouble
        return trouble.notice(self.events.held if self.events else 0) if trouble else ""

    def _write_failed(self, what: str, error: OSError) -> None:
        """A write failed (the journal, a subscriber, status, digest): pause, and say so once."""
        if self.trouble is not None:
            self.trouble.add(what)
            return
        self.trouble = WriteTrouble(what, reason(error), auto_resume=not self.control.paused)
        self.control.paused = True
        notice = self.notice
        with contextlib.suppress(OSError):  # stderr is engine.log, likely on the same full disk
            print(f"tunetop: {notice}", file=sys.stderr, flush=True)
        self.emit("warning", message=notice)  # held with the rest until the journal has room
        self.set_state("paused")

    def _room(self) -> int | None:
        """The least free space where the run writes (its folder, checkpoints, adapters)."""
        run = self.run_dir
        free = [f for f in (free_bytes(run.path), free_bytes(run.checkpoints), free_bytes(run.adapters)) if f is not None]
        return min(free) if free else None

    def _save_room(self) -> int:
        """About what a save writes: the adapter and its numbered copy, and a checkpoint (weights and
        optimizer moments), while the previous files still stand."""
        if not self._save_bytes and self.trainer is not None:
            from tunetop.training.adapters import trainable_weights

            weights = sum(v.nbytes for v in trainable_weights(self.trainer.model).values())
            self._save_bytes = 5 * weights + ROOM_BYTES
        return self._save_bytes or ROOM_BYTES

    def _recover(self, by_user: bool = False) -> bool:
        """Write what is held; True when all of it is written. The run then resumes if the engine
        paused it for this. ``by_user``: a `resume` command, which tries whatever the free space."""
        trouble = self.trouble
        assert trouble is not None and self.events is not None
        trouble.last_try = time.monotonic()
        room = self._room()
        if not by_user and room is not None and room < trouble.room_needed:
            return False
        held = self.events.held
        if not self.events.retry():
            return False
        if self._status_dirty and not self._write_status():
            return False
        if self._tensorboard is not None:
            try:
                self._tensorboard.flush()
            except OSError:
                return False
        if self._digest_dirty and not self._write_digest():
            return False
        save: Any = None
        if not by_user and trouble.save_iteration is not None and self.trainer is not None:
            from tunetop.training.checkpoint import CheckpointError

            try:
                save = self.trainer.save()
            except (OSError, CheckpointError):
                return False
            self._unsaved = None
        self.trouble = None  # before the events below: if they fail, that is a new trouble
        if save is not None:
            self.emit(save.event_type, **asdict(save))
        self.emit("log", message=trouble.recovered(held, save.iteration if save is not None else None))
        if trouble.auto_resume and not by_user and self.trouble is None and not self.control.stop_reason:
            self.control.paused = False
            self.set_state("running")
        return True

    def _retry_unsaved(self) -> str:
        """On `resume` after a failed save: save again once; a note if it fails again."""
        iteration, self._unsaved = self._unsaved, None
        if iteration is None or self.trainer is None or iteration != self.trainer.iteration:
            return ""
        from tunetop.training.checkpoint import CheckpointError

        try:
            save = self.trainer.save()
        except (OSError, CheckpointError) as error:
            note = f"the save at iteration {iteration} failed again ({error}); training goes on and the next save tries again"
            self.emit("warning", message=note)
            return note
        self.emit(save.event_type, **asdict(save))
        return ""

    def _finish_writes(self) -> None:
        """The run is over but some writes are held: wait for room, then let the engine exit.

        Commands are answered (they can do nothing now); a signal gives up waiting."""
        if self.trouble is None:
            return
        self.trouble.ended = True
        self.trouble.auto_resume = False
        with contextlib.suppress(OSError):
            print(f"tunetop: {self.notice}", file=sys.stderr, flush=True)
        before = self.control.stop_reason
        while self.trouble is not None and self.control.stop_reason == before:
            self._refuse_waiting(f"the run has ended: {self.notice}")
            time.sleep(0.2)
            if self.trouble.due():
                self._recover()
        if self.events is not None and self.events.held:
            with contextlib.suppress(OSError):
                print(f"tunetop: gave up waiting for room: {self.events.held} event(s) were never journaled.",
                      file=sys.stderr, flush=True)

    def _log_line(self, message: str) -> None:
        self.emit("log", message=message)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            # The iteration too: a pause lands between reports, and a screen shows where it stopped.
            at = {} if self.trainer is None else {"iteration": self.trainer.iteration}
            self.emit("state", state=state, **at)

    # -- commands ------------------------------------------------------------------------

    def submit(self, command: Command, respond: Callable[[Reply], None], client: bytes = b"") -> None:
        """Queue a command for the loop (thread-safe); ``client`` names the connection it came on."""
        self.commands.put(PendingCommand(command, respond, client))

    def client_gone(self, client: bytes) -> None:
        """The server saw ``client`` disconnect (thread-safe): its samples and evaluations still
        waiting are dropped, since nobody would read their answers."""
        self._gone_clients.put(client)

    def _apply(self, pending: PendingCommand) -> None:
        command, respond = pending.command, pending.respond
        trainer = self._trainer  # commands are applied between steps, once the run is built
        name = command.cmd
        try:
            if name == "pause":
                if self.trouble is not None:  # paused for a full disk: from now on, paused by the user too
                    self.trouble.auto_resume = False
                if self.control.paused:
                    respond(Reply(command.id, True, result={"state": "paused", "note": "already paused"}))
                    return
                self.control.paused = True
                self.set_state("paused")
                respond(Reply(command.id, True, result={"state": "paused", "iteration": trainer.iteration}))
            elif name == "resume":
                was = self.control.paused
                if self.trouble is not None and not self._recover(by_user=True):
                    respond(Reply(command.id, False, f"cannot resume yet: {self.notice}"))
                    return
                retried = self._retry_unsaved()
                self.control.paused = False
                self.set_state("running")
                note = {"note": retried} if retried else {} if was else {"note": "was not paused"}
                respond(Reply(command.id, True, result={"state": "running", **note}))
            elif name == "stop":
                self.control.stop_reason = "stopped"
                self.control.paused = False
                self.set_state("stopping")
                respond(Reply(command.id, True, result={"state": "stopping", "iteration": trainer.iteration}))
            elif name == "save":
                if trainer.iteration == 0:
                    respond(Reply(command.id, False, "nothing to save yet: no step has run"))
                    return
                from tunetop.training.checkpoint import CheckpointError

                try:
                    save = trainer.save()
                except (OSError, CheckpointError) as error:
                    self._save_failed(trainer.iteration, str(error))
                    respond(Reply(command.id, False, f"save failed, run paused: {error}"))
                    return
                self.emit(save.event_type, **asdict(save))
                respond(Reply(command.id, True, result={"iteration": save.iteration, "path": save.path, "checkpoint": save.checkpoint}))
            elif name == "evaluate":
                validation = trainer.validate()
                if validation is None:
                    respond(Reply(command.id, False, "this run has no validation set"))
                    return
                self.emit(validation.event_type, **asdict(validation))
                respond(Reply(command.id, True, result={"iteration": validation.iteration, "loss": validation.loss}))
            elif name == "set":
                changes = self._apply_set(command.args)
                respond(Reply(command.id, True, result={"changes": changes}))
            elif name in ("tag", "note"):
                respond(Reply(command.id, True, result=self._apply_labels(name, command.args)))
            elif name == "sample":
                prompt, max_tokens, temperature, raw = self._sample_args(command.args)
                try:
                    event = self._sample(prompt, max_tokens, temperature, raw)
                except (SampleError, SampleInterrupted) as error:
                    respond(Reply(command.id, False, str(error)))
                    return
                result = {key: event[key] for key in ("iteration", "completion", "prompt_format")}
                respond(Reply(command.id, True, result=result))
            else:
                respond(Reply(command.id, False, f"command {name!r} is not handled by the training loop"))
        except ConfigError as error:
            respond(Reply(command.id, False, str(error)))
        except Exception as error:  # a command must never kill the run
            self.emit("error", message=f"command {name} failed: {type(error).__name__}: {error}")
            respond(Reply(command.id, False, f"{type(error).__name__}: {error}"))

    def _sample_args(self, args: dict[str, Any]) -> tuple[str, int, float, bool]:
        """A ``sample`` command's prompt, max_tokens, temperature and raw, checked; ConfigError says what is wrong."""
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("sample needs args.prompt, a non-empty string")
        max_tokens = args.get("max_tokens", self.cfg.sampling.max_tokens)
        temperature = args.get("temperature", self.cfg.sampling.temperature)
        raw = args.get("raw", False)
        if not isinstance(raw, bool):
            raise ConfigError("sample's args.raw must be true or false")
        max_tokens = config_module.coerce_field("sampling", "max_tokens", max_tokens, "sample")
        temperature = config_module.coerce_field("sampling", "temperature", temperature, "sample")
        return prompt, max_tokens, temperature, raw

    def _sample(self, prompt: str, max_tokens: int, temperature: float, raw: bool = False) -> dict[str, Any]:
        completion = sample(self._trainer, prompt, max_tokens, temperature, raw, should_stop=self._between_tokens)
        return self.emit(
            "sample",
            iteration=self._trainer.iteration,
            prompt=prompt,
            completion=completion,
            max_tokens=max_tokens,
            temperature=temperature,
            prompt_format="raw" if raw else self._trainer.prompt_format,
        )

    def _scheduled_samples(self, trainer: Trainer) -> None:
        """``sampling.sample_prompts`` every ``sample_every`` steps (once per iteration, even if paused)."""
        s = self.cfg.sampling
        due = s.sample_every and s.sample_prompts and trainer.iteration and trainer.iteration % s.sample_every == 0
        if due and self._sampled_at != trainer.iteration:
            self._sampled_at = trainer.iteration
            for prompt in s.sample_prompts:
                try:
                    self._sample(prompt, s.max_tokens, s.temperature)
                except SampleError as error:  # a config's prompt too long for the run: say so, train on
                    self.emit("warning", message=f"sampling.sample_prompts: {error}")
                except SampleInterrupted:
                    return

    def _between_tokens(self) -> bool:
        """A sample's check after each token (and prefill chunk): True to cut it short.

        Quick commands are applied here, so ``pause`` and ``stop`` are answered within a token,
        and a stop (a command, SIGTERM or Ctrl-C) ends the sample at once.
        """
        if self._slow_sample:
            time.sleep(self._slow_sample)
        self._take_incoming()
        for pending in [w for w in self._waiting if w.command.cmd in QUICK_COMMANDS]:
            self._waiting.remove(pending)
            self._apply(pending)
        self._stop_if_deaf()
        return bool(self.control.stop_reason)

    def _apply_labels(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """A ``tag`` or ``note`` command: journal the change (tunetop.runs.labels); ConfigError says what is wrong."""
        from tunetop.runs.labels import LabelError, apply_tag_change, note_problem

        if name == "note":
            text = args.get("text", "")
            if problem := note_problem(text):
                raise ConfigError(problem)
            if text != self._status.get("note", ""):
                self.emit("note", text=text)
            return {"text": text}
        add, remove = args.get("add", []), args.get("remove", [])
        if not isinstance(add, list) or not isinstance(remove, list):
            raise ConfigError("tag takes args.add and args.remove, lists of tags")
        before = list(self._status.get("tags", []))
        try:
            tags = apply_tag_change(before, add, remove)
        except LabelError as error:
            raise ConfigError(str(error)) from None
        if tags != before:
            self.emit("tags", tags=tags)
        return {"tags": tags}

    def _apply_set(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args:
            raise ConfigError("set needs at least one KEY=VALUE; live fields: " + ", ".join(config_module.LIVE_FIELDS))
        values = {key: config_module.coerce_live(key, value) for key, value in args.items()}  # all or nothing
        if "memory_limit_gb" in values:  # the one change that can still fail (in MLX): first, undone on failure
            # A run sharing a GPU can be made to yield memory without a restart.
            before = self._trainer.parameters.memory_limit_gb
            try:
                self._trainer.apply_live("memory_limit_gb", values["memory_limit_gb"])
            except Exception as error:
                raise ConfigError(f"memory_limit_gb = {values['memory_limit_gb']} was refused by MLX ({error}); "
                                  f"it stays {before}. Give a cap in GB within the machine's memory.") from None
        for key, value in values.items():
            section, name = config_module.LIVE_FIELDS[key]
            setattr(getattr(self.cfg, section), name, value)
            if key != "memory_limit_gb":  # applied above
                self._trainer.apply_live(key, value)
        self.emit("config_changed", changes=values)
        return values

    def status_result(self) -> dict[str, Any]:
        trainer = self.trainer
        notice = self.notice
        return {
            "state": self.state,
            "iteration": trainer.iteration if trainer else 0,
            "iterations": self.cfg.training.iterations,
            "seq": self.events.last_seq if self.events else 0,
            **({"notice": notice} if notice else {}),
        }

    def server_died(self, why: str) -> None:
        """The command server ended (called from its thread): the loop saves and stops at the next step.

        Without it nothing can pause, stop or watch the run; training on deaf would hold the GPU
        until a SIGTERM, with `tunetop ls` saying all is well.
        """
        self._server_failure = why or "unknown error"

    def _stop_if_deaf(self) -> None:
        if self._server_failure and self.control.stop_reason != "server_failed":
            self.emit("error", message=f"the command server stopped ({self._server_failure}); nothing can pause, "
                      "stop or watch this run any more, so it saves and stops. Continue it with "
                      f"`tunetop train --resume {self.run_dir.id}`.")
            self.control.stop_reason = "server_failed"
            self.control.exit_code = EXIT_FAILED
            self.control.paused = False

    def _control(self, trainer: Trainer) -> Disposition:
        """The loop's between-steps hook: apply commands, idle while paused.

        While training, at most one heavy command (a sample or an evaluation) runs per step
        boundary: a queue of them slows training down but never holds it.
        """
        from tunetop.training.trainer import Disposition

        self._scheduled_samples(trainer)
        self._emit_system()
        if self._first_iteration is None:
            self._first_iteration = trainer.iteration
        elif trainer.iteration > self._first_iteration and not self._status.get("stepped"):
            # This engine's first step ran: `train --detach` knows the engine got past it, and
            # `ls` no longer counts the run among those that failed before training.
            self._status.update(stepped=True, trained=True)
            self._write_status()
        heavy_ran = False
        while True:
            self._stop_if_deaf()
            if self.world is not None:
                self.world.check()  # a rank that died while this one idled ends the run now
            if self.trouble is not None and self.trouble.due():
                self._recover()
            if self.control.stop_reason:
                return Disposition.STOP
            self._take_incoming()
            pending = self._next_waiting(heavy=self.control.paused or not heavy_ran)
            if pending is not None:
                heavy_ran = heavy_ran or pending.command.cmd in HEAVY_COMMANDS
                self._apply(pending)
                continue
            if not self.control.paused:
                return Disposition.MORE
            self._emit_system()  # paused, the machine is still watched
            with contextlib.suppress(queue.Empty):  # paused with nothing to do: wait for a command
                self._enqueue(self.commands.get(timeout=0.2))

    def _emit_system(self) -> None:
        """The machine's newest sample as a ``system`` event, if one was taken since the last.

        Not while writes fail: a reading of the machine is not worth holding in memory for later."""
        if self._monitor is None or self.trouble is not None:
            return
        sample = self._monitor.take()
        if sample is not None:
            self.emit("system", **sample)

    def _enqueue(self, pending: PendingCommand) -> None:
        if pending.command.cmd == "sample":  # bad arguments are answered now, not after the queue's wait
            try:
                self._sample_args(pending.command.args)
            except ConfigError as error:
                pending.respond(Reply(pending.command.id, False, str(error)))
                return
        if pending.command.cmd in HEAVY_COMMANDS:
            if self._heavy_waiting >= MAX_WAITING_HEAVY:
                pending.respond(Reply(pending.command.id, False, f"busy: {MAX_WAITING_HEAVY} samples and evaluations "
                                      "are already waiting their turn; ask again once some are answered"))
                return
            mine = sum(1 for w in self._waiting if w.client == pending.client and w.command.cmd in HEAVY_COMMANDS)
            if pending.client and mine >= MAX_WAITING_HEAVY_PER_CLIENT:
                pending.respond(Reply(pending.command.id, False, f"busy: this client already has {mine} samples and "
                                      f"evaluations waiting their turn (at most {MAX_WAITING_HEAVY_PER_CLIENT} per "
                                      "client); ask again once some are answered"))
                return
            self._heavy_waiting += 1
        self._waiting.append(pending)

    def _take_incoming(self) -> None:
        """Move what the server thread queued to ``_waiting`` (refusing heavy commands past the limit),
        then drop what disconnected clients left waiting."""
        while True:
            try:
                self._enqueue(self.commands.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                self._drop_waiting_of(self._gone_clients.get_nowait())
            except queue.Empty:
                return

    def _drop_waiting_of(self, client: bytes) -> None:
        dropped = [w for w in self._waiting if w.client == client and w.command.cmd in HEAVY_COMMANDS]
        for pending in dropped:
            self._waiting.remove(pending)
            self._heavy_waiting -= 1
            pending.respond(Reply(pending.command.id, False, "dropped: the client that asked disconnected before its turn"))
        if dropped:
            kinds = collections.Counter(pending.command.cmd for pending in dropped)
            what = " and ".join(f"{count} {cmd}{'s' if count > 1 else ''}" for cmd, count in sorted(kinds.items()))
            self.emit("log", message=f"dropped {what} still waiting for a client that disconnected")

    def _next_waiting(self, heavy: bool) -> PendingCommand | None:
        """The oldest waiting command, skipping heavy ones unless ``heavy``."""
        for index, pending in enumerate(self._waiting):
            if pending.command.cmd in HEAVY_COMMANDS:
                if not heavy:
                    continue
                self._heavy_waiting -= 1
            del self._waiting[index]
            return pending
        return None

    def _refuse_waiting(self, why: str) -> None:
        """Answer every command still waiting: the loop that would apply them has ended."""
        self._take_incoming()
        while self._waiting:
            pending = self._waiting.popleft()
            pending.respond(Reply(pending.command.id, False, why))
        self._heavy_waiting = 0

    # -- the run -------------------------------------------------------------------------

    def request_stop(self, reason: str, exit_code: int) -> None:
        """Ask the loop to save and stop at the next step boundary (signal-safe)."""
        self.control.stop_reason = reason
        self.control.exit_code = exit_code
        self.control.paused = False

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: Any) -> None:
            if self.control.stop_reason:  # a second Ctrl-C: leave now, the journal is already safe
                raise KeyboardInterrupt
            code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED
            self.request_stop("interrupted" if signum == signal.SIGINT else "terminated", code)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _last_checkpoint(self) -> str:
        """A sentence naming the run's latest complete checkpoint, or saying there is none."""
        from tunetop.training.checkpoint import checkpoint_iteration, latest_checkpoint

        try:
            latest = latest_checkpoint(self.run_dir.checkpoints)
        except OSError:
            latest = None
        if latest is None:
            return "No checkpoint has been saved yet."
        return f"The last checkpoint, of iteration {checkpoint_iteration(latest):,}, is intact ({latest})."

    def _save_failed(self, iteration: int, error: str) -> None:
        self._unsaved = iteration
        needed = self._save_room()
        room = self._room()
        full = room is not None and room < needed
        by_itself = " It saves and resumes by itself once there is room (checked every few seconds)." if full else ""
        self.emit("error", message=f"could not save at iteration {iteration}: {error}. {self._last_checkpoint()} "
                  f"The run is paused: free space or fix the folder, then resume.{by_itself}")
        if full:  # a full disk: wait for room, then save again (tunetop.runs.write_trouble)
            if self.trouble is None:
                self.trouble = WriteTrouble(f"the save of iteration {iteration}", error, auto_resume=not self.control.paused)
            self.trouble.room_needed = max(self.trouble.room_needed, needed)
            self.trouble.save_iteration = iteration
        self.control.paused = True
        self.set_state("paused")

    def _progress(self, event: Progress) -> Disposition:
        from tunetop.training.trainer import Disposition, NonFinite, Save, SaveFailed, Train, Validation

        if isinstance(event, NonFinite):
            self.emit(event.event_type, **asdict(event))
            self.emit("warning", message=f"{nonfinite_message(event)} {self._last_checkpoint()}")
            if event.action == "pause":
                self.control.paused = True
                self.set_state("paused")
            elif event.action == "stop":
                self.control.stop_reason = "non_finite"
            return Disposition.MORE
        if isinstance(event, SaveFailed):
            self._save_failed(event.iteration, event.error)
            if self.trouble is not None and self.trouble.save_iteration == event.iteration:
                # A full disk: wait for room here rather than at the next step, since the run's
                # last save has no next step. Other failures (NaN weights) pause at the next one.
                return self._control(self._trainer)
            return Disposition.MORE

        if isinstance(event, Train) and not math.isfinite(event.loss):
            self.emit("warning", message=f"non-finite training loss at iteration {event.iteration}")
        if not isinstance(event, (Train, Validation, Save)):  # a new progress type must be sent here, not dropped
            raise TypeError(f"Engine._progress does not know {type(event).__name__}: add it there")
        self.emit(event.event_type, **asdict(event))
        return Disposition.STOP if self.control.stop_reason else Disposition.MORE

    def run(self) -> int:
        """Train to the end; return the process exit code (see README, 'Exit codes')."""
        self.run_dir.make_private()  # a run made by an older version was 0755 / 0644
        self.lock.acquire()
        try:
            from tunetop.control.history import History
            from tunetop.control.journal import JournalError

            try:
                history = History()
                journal = JournalWriter(self.run_dir.journal, history=history)
            except JournalError as error:
                raise RunError(
                    f"{error} The run's event history cannot be read, so this engine cannot add to it. The "
                    f"checkpoints are untouched: restore journal.ttj from a copy, or move it aside (the TUI "
                    f"then shows only what happens from now on) and run `tunetop train --resume {self.run_dir.id}` again."
                ) from None
            self.events = EventLog(self.run_dir.id, journal)
            self._status.update(status_labels(fold_labels([p for _s, p in history.records()[1]], self.cfg.tags)))
            self.events.on_trouble = self._write_failed
            if self.echo is not None:
                self.events.subscribers.append(self.echo)
            for repaired in self.events.journal.repairs:  # a damaged journal, mended on open
                self.emit("warning", message=repaired)
            if self.lock.replaced:
                with contextlib.suppress(OSError):
                    print(f"tunetop: warning: {self.lock.replaced}", file=sys.stderr, flush=True)
                self.emit("warning", message=self.lock.replaced)
            if self.cfg.metrics.tensorboard:
                from tunetop.interop.tensorboard import TensorBoardWriter

                self._tensorboard = TensorBoardWriter(self.run_dir.path / "tensorboard", private=True)
                self.events.subscribers.append(self._tensorboard.on_event)
            if self.cfg.notify.command:
                from tunetop.runs.notify import CommandNotifier

                self._notifier = CommandNotifier(self.cfg.notify.command, self.cfg.notify.timeout, self._warn)
                self.events.subscribers.append(self._notifier.on_event)
            code = EXIT_FAILED  # what the trackers hear if the run ends by an exception
            try:
                try:
                    for hook in self.on_ready:
                        hook(self)
                except SocketError as error:  # a socket folder that is not private, an address in use
                    self.emit("error", message=str(error))
                    self.set_state("failed")
                    self.emit("finished", reason="bad_input", iteration=0)
                    return EXIT_BAD_INPUT
                self._install_signal_handlers()
                code = self._run()
                self._finish_writes()
                return code
            except Exception as error:  # a bug: the run still ends as failed, with one clear line
                return self._crashed(error)
            finally:
                if self._notifier is not None:  # its failure is still journaled and published
                    self._notifier.close()
                for hook in self.on_close:
                    hook(self)
                self.events.close()
                if self._tensorboard is not None:
                    self._tensorboard.close()
                for tracker in self._trackers:
                    tracker.close(code)
        finally:
            self.lock.release()

    def _run(self) -> int:
        self.set_state("starting")
        try:
            text = self.run_dir.config.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = config_module.dumps(self.cfg)
        try:
            shard = self._start_world(text)
        except Exception as error:  # WorldError, or the backend refusing to start
            return self._fail_world(f"the ranks could not start: {error}")
        from tunetop.training.run_warnings import WarningSink

        try:
            # From loading the model and data to the end: every warning is a journaled event.
            with WarningSink(self.emit) as self._warnings:
                return self._train(text, shard)
        finally:
            if self.world is not None:
                self.world.close()

    def _start_world(self, config_text: str) -> Any:
        """Start and join the other ranks of a distributed run; None for one process."""
        if self.plan is None or not self.plan.distributed:
            return None
        from tunetop.runs.distributed import Coordinator, Ranks, init_group
        from tunetop.training.trainer import Shard

        local = None if self.plan.launched else Ranks.start(self.run_dir.path, self.plan.host_list(), self.plan.backend)
        try:
            group = init_group(self.plan.backend)
            self.world = Coordinator(group.size(), local)
        except BaseException:
            if local is not None:
                for process in local.processes.values():
                    process.kill()
            raise
        self.world.wait_for_followers()
        self.world.setup(config_text, self.cfg.source or str(self.run_dir.config))
        self.emit("world", size=group.size(), backend=self.plan.backend)
        return Shard(group, group.rank(), group.size())

    def _crashed(self, error: Exception) -> int:
        """End the run as failed after an unexpected exception (a bug), its traceback in the log."""
        when = "while starting" if self.state in ("", "starting") else f"at iteration {self.trainer.iteration if self.trainer else 0}"
        self.emit("error", message=f"internal error {when}: {type(error).__name__}: {error}. This is a bug in "
                  f"tunetop; `tunetop events {self.run_dir.id}` shows its traceback.")
        self.emit("log", message=traceback.format_exc())
        self.set_state("failed")
        self.emit("finished", reason="failed", iteration=self.trainer.iteration if self.trainer else 0)
        return EXIT_FAILED

    def _fail_world(self, message: str) -> int:
        self.emit("error", message=message)
        self.set_state("failed")
        self.emit("finished", reason="failed", iteration=self.trainer.iteration if self.trainer else 0)
        return EXIT_FAILED

    def _rank_failed(self, error: BaseException) -> int:
        assert self.world is not None and self.plan is not None  # only a distributed run loses a rank
        lost = self.world.lost_ranks()
        iteration = self.trainer.iteration if self.trainer else 0
        who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {lost}" if lost else "a rank"
        plan = self.plan
        ranks = f"--hosts {plan.hosts}" if plan.hosts else f"--np {self.world.size}"
        backend = "" if plan.backend == "ring" else f" --backend {plan.backend}"
        message = (
            f"{who} stopped responding at iteration {iteration} ({error}); the run ends. Its last checkpoint "
            f"is intact: continue with `tunetop train --resume {self.run_dir.id} {ranks}{backend}`."
        )
        self.emit("rank_failed", ranks=lost, iteration=iteration, message=message)
        self.emit("error", message=message)
        self.set_state("failed")
        self.emit("finished", reason="rank_failed", iteration=iteration)
        return EXIT_FAILED

    def _train(self, config_text: str, shard: Shard | None) -> int:
        from tunetop.runs.distributed import is_peer_failure

        try:
            trainer, model_path, trainable, total = self._build(config_text, shard)
            self._open_trackers()
        except (ConfigError, DataError, ModelError) as error:
            message = config_module.place_error(str(error), self.cfg.source) if isinstance(error, ConfigError) else str(error)
            self.emit("error", message=message)
            self.set_state("failed")
            self.emit("finished", reason="bad_input", iteration=0)
            return EXIT_BAD_INPUT
        self.trainer = trainer
        trainer.journal_seq = lambda: self.events.last_seq if self.events else 0
        self._clean_after_crash()
        if self.resume:
            from tunetop.training.checkpoint import CheckpointError, find_checkpoint

            try:
                folder = find_checkpoint(self.run_dir.checkpoints, self.resume_from)
                restored = trainer.restore(folder)
            except CheckpointError as error:
                self.emit("error", message=f"cannot resume: {error}")
                self.set_state("failed")
                self.emit("finished", reason="bad_input", iteration=0)
                return EXIT_BAD_INPUT
            changed = self._config_changes(restored, trainer.parameters)
            if changed:
                self.emit("warning", message=f"the run's config changed since this checkpoint was saved ({changed}); "
                          "training goes on with the config as it is now, so the resume is not exact")
            self.emit("resumed", iteration=restored.iteration, checkpoint=str(folder), from_seq=restored.seq)
        if self.world is not None:
            try:
                self.world.share_state(trainer)
            except Exception as error:
                if is_peer_failure(error):
                    return self._rank_failed(error)
                raise
            world = self.world
            trainer.before_step = lambda t: world.step(t.iteration, t.learning_rate, t.parameters.memory_limit_gb)
        self.emit(
            "run_started",
            config=self.cfg.to_dict(),
            model=model_path,
            trainable_parameters=trainable,
            total_parameters=total,
            iterations=self.cfg.training.iterations,
            name=self.cfg.name,
        )
        self.set_state("running")
        from tunetop.training.trainer import run_loop

        if self.cfg.metrics.system_seconds > 0:
            from tunetop.runs.machine import SystemMonitor

            self._monitor = SystemMonitor(self.cfg.metrics.system_seconds)
            self._monitor.start()
        try:
            result = run_loop(trainer, self._progress, self._control)
        except Exception as error:
            if self.world is not None and is_peer_failure(error):
                return self._rank_failed(error)
            self.emit("error", message=f"training failed: {type(error).__name__}: {error}")
            self.emit("log", message=traceback.format_exc())
            self.set_state("failed")
            self.emit("finished", reason="failed", iteration=trainer.iteration)
            self._refuse_waiting("the run has failed")
            return EXIT_FAILED
        finally:
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
        reason = self.control.stop_reason or result.reason
        self._scheduled_samples(trainer)  # the samples due at the last step (the loop's hook runs before steps)
        self.set_state("failed" if reason == "server_failed" else "finished")
        stopping = trainer.early_stopping
        if reason == "early_stopped":
            self.emit("log", message=stopping.describe())
        best = {} if stopping.lowest_iteration is None else {"best_iteration": stopping.lowest_iteration, "best_loss": stopping.lowest_loss}
        self.emit("finished", reason=reason, iteration=trainer.iteration, **best)
        self._refuse_waiting("the run has finished")  # commands that came after the last step still get an answer
        return self.control.exit_code

    def _warn(self, message: str) -> None:
        self.emit("warning", message=message)

    def _open_trackers(self) -> None:
        """W&B and SwanLab (metrics.wandb, metrics.swanlab): subscribers from here on, closed with the run."""
        if not (self.cfg.metrics.wandb or self.cfg.metrics.swanlab):
            return
        from tunetop.interop.trackers import open_trackers

        assert self.events is not None
        self._trackers = open_trackers(
            self.cfg, self.run_dir.id, self.run_dir.path, self._warn
        )
        self.events.subscribers.extend(tracker.on_event for tracker in self._trackers)

    def _clean_after_crash(self) -> None:
        """Leftovers of an engine killed mid-write: temp files of adapter writes, and a ``latest``
        checkpoint pointer that names nothing complete (tunetop.training.checkpoint.recover). Safe here:
        this engine holds the run's lock and has not written yet."""
        from tunetop.atomic import remove_stale_temps
        from tunetop.training.checkpoint import recover

        try:
            remove_stale_temps(self.run_dir.adapters)
            for folder in recover(self.run_dir.checkpoints):
                self.emit("warning", message=f"recovered checkpoint {folder.name} from a save a crash interrupted")
        except OSError as error:  # a read-only folder: the save that needs it reports it
            self.emit("warning", message=f"could not clean up after the last crash: {error}")

    @staticmethod
    def _config_changes(restored: Any, parameters: Any) -> str:
        """What changed in the config that decides the computation since a checkpoint; "" if nothing.

        Checkpoints of older versions hold only a hash of the config file's text."""
        if restored.config is not None:
            return "; ".join(config_module.changed_values(restored.config, parameters.config_values))
        if restored.config_hash and restored.config_hash != parameters.config_hash:
            return "config.toml's text differs"
        return ""

    def _build(self, text: str, shard: Shard | None) -> tuple[Trainer, str, int, int]:
        from tunetop.training.checkpoint import config_hash

        return build_trainer(
            self.cfg,
            self.run_dir.adapters,  # checkpoints.adapter_path, relative to the run folder
            checkpoint_path=self.run_dir.checkpoints,
            config_hash=config_hash(text),
            shard=shard,
            report=self._log_line,
        )
