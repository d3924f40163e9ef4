"""One engine process owning one run: set-up from the config, the loop, commands, shutdown.

``Engine.run()`` loads the model, tokenizer and data named by the config, applies LoRA, and
drives :func:`engine.trainer.run_loop`. Every progress event becomes a journaled protocol event.
Commands arrive on a thread-safe queue (filled by the ZeroMQ server thread) and are applied
between steps by the loop's control hook, so training never waits on a client.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as config_module
from .config import EMBEDDED, ConfigError, RunConfig
from .data import DataError
from .events import EventLog
from .journal import JournalWriter
from .protocol import Command, Reply
from .runs import RunDir, RunLock

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message names it and says what to check."""


@dataclass
class PendingCommand:
    """A command waiting for the loop, and how to answer it."""

    command: Command
    respond: Callable[[Reply], None]


@dataclass
class ControlState:
    paused: bool = False
    stop_reason: str = ""
    exit_code: int = EXIT_OK


def load_model_and_tokenizer(cfg: RunConfig, report: Callable[[str], None] | None = None) -> tuple[Any, Any, str]:
    """mlx-lm's loader on a local folder or a Hugging Face id (downloaded first, with progress).

    The embedded default is built first. ``report`` receives download and build progress lines.
    """
    from mlx_lm import load

    from . import hub
    from .demo import embedded_model_path

    path = str(embedded_model_path(report)) if cfg.model.path == EMBEDDED else cfg.model.path
    where = f"model.path in {cfg.source or 'the config'}"
    try:
        if not hub.is_local(path) and "/" in path and not path.startswith((".", "/", "~")):
            path = str(hub.fetch(path, cfg.model.revision or None, report or (lambda _line: None)))
        model, tokenizer = load(  # type: ignore[misc]
            path, revision=cfg.model.revision or None, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as error:  # mlx-lm / huggingface_hub raise many types; all mean "cannot load"
        raise ModelError(hub.explain(cfg.model.path, where, error)) from None
    return model, tokenizer, path


class Engine:
    """Runs one training run to its end, publishing events and taking commands."""

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        echo: Callable[[dict[str, Any], bytes], None] | None = None,
        resume: bool = False,
        resume_from: int | None = None,
        plan: Any = None,
    ):
        self.plan = plan  # distributed.Plan: how many ranks; None or size 1 = one process
        self.world: Any = None  # distributed.Coordinator once the ranks have joined
        self.resume = resume
        self.resume_from = resume_from
        self.cfg = cfg
        self.run_dir = run
        self.commands: queue.Queue[PendingCommand] = queue.Queue()
        self.control = ControlState()
        self.lock = RunLock(run)
        self.events: EventLog | None = None
        self.echo = echo
        self.trainer: Any = None
        self.state = ""
        # The pid tells a starter waiting on status.json that this engine, not an earlier one, wrote it.
        self._status: dict[str, Any] = {"name": cfg.name, "iterations": cfg.training.iterations, "pid": os.getpid()}
        self.on_ready: list[Callable[[Engine], Any]] = []
        self.on_close: list[Callable[[Engine], Any]] = []
        self._sampled_at = -1

    # -- events --------------------------------------------------------------------------

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        assert self.events is not None
        event = self.events.emit(type_, **fields)
        self._update_status(event)
        if type_ == "save":  # a crash later costs a reader only the events since this save
            with contextlib.suppress(OSError):
                self.events.write_digest()
        return event

    def _update_status(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        status = self._status
        if kind == "train":
            status.update(iteration=event["iteration"], loss=event["loss"])
        elif kind == "validation":
            status.update(iteration=event["iteration"], val_loss=event["loss"])
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
        self.run_dir.write_status(status)

    def _log_line(self, message: str) -> None:
        self.emit("log", message=message)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.emit("state", state=state)

    # -- commands ------------------------------------------------------------------------

    def submit(self, command: Command, respond: Callable[[Reply], None]) -> None:
        """Queue a command for the loop (thread-safe)."""
        self.commands.put(PendingCommand(command, respond))

    def _apply(self, pending: PendingCommand) -> None:
        command, respond = pending.command, pending.respond
        trainer = self.trainer
        name = command.cmd
        try:
            if name == "pause":
                if self.control.paused:
                    respond(Reply(command.id, True, result={"state": "paused", "note": "already paused"}))
                    return
                self.control.paused = True
                self.set_state("paused")
                respond(Reply(command.id, True, result={"state": "paused", "iteration": trainer.iteration}))
            elif name == "resume":
                was = self.control.paused
                self.control.paused = False
                self.set_state("running")
                note = {} if was else {"note": "was not paused"}
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
                from .checkpoint import CheckpointError

                try:
                    save = trainer.save()
                except (OSError, CheckpointError) as error:
                    self._save_failed(trainer.iteration, str(error))
                    respond(Reply(command.id, False, f"save failed, run paused: {error}"))
                    return
                self.emit("save", **save.__dict__)
                respond(Reply(command.id, True, result={"iteration": save.iteration, "path": save.path, "checkpoint": save.checkpoint}))
            elif name == "evaluate":
                validation = trainer.validate()
                if validation is None:
                    respond(Reply(command.id, False, "this run has no validation set"))
                    return
                self.emit("validation", iteration=validation.iteration, loss=validation.loss, seconds=validation.seconds)
                respond(Reply(command.id, True, result={"iteration": validation.iteration, "loss": validation.loss}))
            elif name == "set":
                changes = self._apply_set(command.args)
                respond(Reply(command.id, True, result={"changes": changes}))
            elif name == "status":
                respond(Reply(command.id, True, result=self.status_result()))
            elif name == "sample":
                prompt = command.args.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    respond(Reply(command.id, False, "sample needs args.prompt, a non-empty string"))
                    return
                max_tokens = command.args.get("max_tokens", self.cfg.sampling.max_tokens)
                temperature = command.args.get("temperature", self.cfg.sampling.temperature)
                raw = command.args.get("raw", False)
                if not isinstance(raw, bool):
                    respond(Reply(command.id, False, "sample's args.raw must be true or false"))
                    return
                try:
                    max_tokens = config_module.coerce_field("sampling", "max_tokens", max_tokens, "sample")
                    temperature = config_module.coerce_field("sampling", "temperature", temperature, "sample")
                except ConfigError as error:
                    respond(Reply(command.id, False, str(error)))
                    return
                event = self._sample(prompt, max_tokens, temperature, raw)
                result = {key: event[key] for key in ("iteration", "completion", "prompt_format")}
                respond(Reply(command.id, True, result=result))
            else:
                respond(Reply(command.id, False, f"command {name!r} is not handled by the training loop"))
        except ConfigError as error:
            respond(Reply(command.id, False, str(error)))
        except Exception as error:  # a command must never kill the run
            self.emit("error", message=f"command {name} failed: {type(error).__name__}: {error}")
            respond(Reply(command.id, False, f"{type(error).__name__}: {error}"))

    def _sample(self, prompt: str, max_tokens: int, temperature: float, raw: bool = False) -> dict[str, Any]:
        completion = sample(self.trainer, prompt, max_tokens, temperature, raw)
        return self.emit(
            "sample",
            iteration=self.trainer.iteration,
            prompt=prompt,
            completion=completion,
            max_tokens=max_tokens,
            temperature=temperature,
            prompt_format="raw" if raw else self.trainer.prompt_format,
        )

    def _scheduled_samples(self, trainer: Any) -> None:
        """``sampling.sample_prompts`` every ``sample_every`` steps (once per iteration, even if paused)."""
        s = self.cfg.sampling
        due = s.sample_every and s.sample_prompts and trainer.iteration and trainer.iteration % s.sample_every == 0
        if due and self._sampled_at != trainer.iteration:
            self._sampled_at = trainer.iteration
            for prompt in s.sample_prompts:
                self._sample(prompt, s.max_tokens, s.temperature)

    def _apply_set(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args:
            raise ConfigError("set needs at least one KEY=VALUE; live fields: " + ", ".join(config_module.LIVE_FIELDS))
        values = {key: config_module.coerce_live(key, value) for key, value in args.items()}  # all or nothing
        p = self.trainer.parameters
        for key, value in values.items():
            section, name = config_module.LIVE_FIELDS[key]
            setattr(getattr(self.cfg, section), name, value)
            if key == "learning_rate":
                # From now on a constant rate: the user took the wheel from the schedule.
                self.trainer.set_learning_rate(value)
            elif key == "save_every":
                p.save_every = value
            elif key == "memory_limit_gb":
                # A run sharing a GPU can be made to yield memory without a restart.
                p.memory_limit_gb = value
                self.trainer.apply_memory_limit()
            else:
                setattr(p, key, value)
        self.emit("config_changed", changes=values)
        return values

    def status_result(self) -> dict[str, Any]:
        trainer = self.trainer
        return {
            "state": self.state,
            "iteration": trainer.iteration if trainer else 0,
            "iterations": self.cfg.training.iterations,
            "seq": self.events.last_seq if self.events else 0,
        }

    def _control(self, trainer: Any) -> Any:
        """The loop's between-steps hook: apply commands, idle while paused."""
        from .trainer import Disposition

        self._scheduled_samples(trainer)
        while True:
            if self.world is not None:
                self.world.check()  # a rank that died while this one idled ends the run now
            try:
                pending = self.commands.get(timeout=0.2 if self.control.paused else 0)
            except queue.Empty:
                pending = None
            if pending is not None:
                self._apply(pending)
            if self.control.stop_reason:
                return Disposition.STOP
            if not self.control.paused and self.commands.empty():
                return Disposition.MORE

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

    def _save_failed(self, iteration: int, error: str) -> None:
        self.emit("error", message=f"could not save at iteration {iteration}: {error}. The previous checkpoint "
                  "is intact; the run is paused: free space or fix the folder, then resume.")
        self.control.paused = True
        self.set_state("paused")

    def _progress(self, event: Any) -> Any:
        from .trainer import Disposition, NonFinite, Save, SaveFailed, Train, Validation

        if isinstance(event, NonFinite):
            self.emit("nonfinite", **event.__dict__)
            what = {"skipped": "the batch was skipped", "pause": "the run is paused", "stop": "the run stops"}
            self.emit(
                "warning",
                message=f"loss is {event.loss} at iteration {event.iteration} (epoch {event.epoch}, batch "
                f"{event.batch}): {what.get(event.action, event.action)}; the last good checkpoint is kept.",
            )
            if event.action == "pause":
                self.control.paused = True
                self.set_state("paused")
            elif event.action == "stop":
                self.control.stop_reason = "non_finite"
            return Disposition.MORE
        if isinstance(event, SaveFailed):
            self._save_failed(event.iteration, event.error)
            return Disposition.MORE

        if isinstance(event, Train):
            fields = dict(event.__dict__)
            if not math.isfinite(fields["loss"]):
                self.emit("warning", message=f"non-finite training loss at iteration {event.iteration}")
            self.emit("train", **fields)
        elif isinstance(event, Validation):
            self.emit("validation", **event.__dict__)
        elif isinstance(event, Save):
            self.emit("save", **event.__dict__)
        return Disposition.STOP if self.control.stop_reason else Disposition.MORE

    def run(self) -> int:
        """Train to the end; return the process exit code (see README, 'Exit codes')."""
        self.lock.acquire()
        try:
            from .history import History

            self.events = EventLog(self.run_dir.id, JournalWriter(self.run_dir.journal, history=History()))
            if self.echo is not None:
                self.events.subscribers.append(self.echo)
            tensorboard = None
            if self.cfg.metrics.tensorboard:
                from .tensorboard import TensorBoardWriter

                tensorboard = TensorBoardWriter(self.run_dir.path / "tensorboard")
                self.events.subscribers.append(tensorboard.on_event)
            for hook in self.on_ready:
                hook(self)
            self._install_signal_handlers()
            try:
                return self._run()
            finally:
                for hook in self.on_close:
                    hook(self)
                self.events.close()
                if tensorboard is not None:
                    tensorboard.close()
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
        try:
            return self._train(text, shard)
        finally:
            if self.world is not None:
                self.world.close()

    def _start_world(self, config_text: str) -> Any:
        """Start and join the other ranks of a distributed run; None for one process."""
        if self.plan is None or not self.plan.distributed:
            return None
        from .distributed import Coordinator, Ranks, init_group
        from .trainer import Shard

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

    def _fail_world(self, message: str) -> int:
        self.emit("error", message=message)
        self.set_state("failed")
        self.emit("finished", reason="failed", iteration=self.trainer.iteration if self.trainer else 0)
        return EXIT_FAILED

    def _rank_failed(self, error: BaseException) -> int:
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

    def _train(self, config_text: str, shard: Any) -> int:
        from .distributed import is_peer_failure

        try:
            trainer, model_path, trainable, total = self._build(config_text, shard)
        except (ConfigError, DataError, ModelError) as error:
            self.emit("error", message=str(error))
            self.set_state("failed")
            self.emit("finished", reason="bad_input", iteration=0)
            return EXIT_BAD_INPUT
        self.trainer = trainer
        trainer.journal_seq = lambda: self.events.last_seq if self.events else 0
        if self.resume:
            from .checkpoint import CheckpointError, find_checkpoint

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
        from .trainer import run_loop

        previous_showwarning = warnings.showwarning
        # Warnings from the data layer and mlx-lm become events the moment they happen.
        def show_warning(message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
            self.emit("warning", message=str(message))

        warnings.showwarning = show_warning
        try:
            result = run_loop(trainer, self._progress, self._control)
        except Exception as error:
            if self.world is not None and is_peer_failure(error):
                return self._rank_failed(error)
            self.emit("error", message=f"training failed: {type(error).__name__}: {error}")
            self.emit("log", message=traceback.format_exc())
            self.set_state("failed")
            self.emit("finished", reason="failed", iteration=trainer.iteration)
            return EXIT_FAILED
        finally:
            warnings.showwarning = previous_showwarning
        reason = self.control.stop_reason or result.reason
        self._scheduled_samples(trainer)  # the samples due at the last step (the loop's hook runs before steps)
        self.set_state("finished")
        self.emit("finished", reason=reason, iteration=trainer.iteration)
        # Commands that arrived after the last step still get an answer.
        while not self.commands.empty():
            pending = self.commands.get_nowait()
            pending.respond(Reply(pending.command.id, False, "the run has finished"))
        return self.control.exit_code

    @staticmethod
    def _config_changes(restored: Any, parameters: Any) -> str:
        """What changed in the config that decides the computation since a checkpoint; "" if nothing.

        Checkpoints of older versions hold only a hash of the config file's text."""
        if restored.config is not None:
            return "; ".join(config_module.changed_values(restored.config, parameters.config_values))
        if restored.config_hash and restored.config_hash != parameters.config_hash:
            return "config.toml's text differs"
        return ""

    def _build(self, text: str, shard: Any) -> tuple[Any, str, int, int]:
        from .checkpoint import config_hash

        return build_trainer(
            self.cfg,
            self.run_dir.adapters,  # checkpoints.adapter_path, relative to the run folder
            checkpoint_path=self.run_dir.checkpoints,
            config_hash=config_hash(text),
            shard=shard,
            report=self._log_line,
        )


def build_trainer(
    cfg: RunConfig,
    adapter_path: Path,
    checkpoint_path: Path | None = None,
    config_hash: str = "",
    shard: Any = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Any, str, int, int]:
    """Model, adapters, data, optimizer from a config: (trainer, model path, trainable, total).

    ``report`` receives progress lines while a model downloads.
    """
    from .adapters import adapter_config, apply_fine_tuning, count_parameters
    from .datasource import load_run_splits
    from .optimizers import build_optimizer, build_schedule
    from .trainer import Trainer, TrainingParameters, seed_everything

    config_module.check_paths(cfg)
    if shard is not None and cfg.training.batch_size % shard.size:
        raise ConfigError(
            f"{cfg.source or 'config'}: training.batch_size = {cfg.training.batch_size} does not split over "
            f"{shard.size} ranks. The batch size is global: make it a multiple of the number of ranks."
        )
    model, tokenizer, model_path = load_model_and_tokenizer(cfg, report)
    splits = load_run_splits(cfg, tokenizer)
    # The LoRA weights are drawn from the global streams: seed them here, not before loading,
    # because loading may have drawn (a first run builds the embedded model in this process).
    seed_everything(cfg.training.seed)
    apply_fine_tuning(model, cfg.lora)
    trainable, total = count_parameters(model)
    t = cfg.training
    pack_width = choose_pack_width(cfg, splits["train"], model, report)
    parameters = TrainingParameters(
        batch_size=t.batch_size,
        iterations=t.iterations,
        steps_per_report=t.steps_per_report,
        steps_per_eval=t.steps_per_eval,
        validation_batches=t.validation_batches,
        save_every=cfg.checkpoints.save_every,
        adapter_path=adapter_path,
        max_seq_length=cfg.data.max_seq_length,
        grad_checkpoint=t.grad_checkpoint,
        grad_checkpoint_blocks=t.grad_checkpoint_blocks,
        grad_accumulation_steps=t.grad_accumulation_steps,
        seed=t.seed,
        keep_last=cfg.checkpoints.keep_last,
        adapter_config=adapter_config(cfg.lora, model_path),
        checkpoint_path=checkpoint_path,
        on_nonfinite=t.on_nonfinite,
        config_hash=config_hash,
        pack_width=pack_width,
        ce_chunk_tokens=t.ce_chunk_tokens,
        clear_cache_gb=t.clear_cache_gb,
        memory_limit_gb=t.memory_limit_gb,
        config_values=config_module.computation_values(cfg),
    )
    optimizer = build_optimizer(cfg.optimizer)
    schedule = build_schedule(cfg.optimizer, cfg.schedule, t.iterations)
    trainer = Trainer(model, optimizer, splits["train"], splits.get("valid"), parameters, schedule, shard=shard)
    trainer.tokenizer = tokenizer  # for samples from the live adapter (prompts formatted as the training data's)
    if pack_width and report is not None:
        report(trainer.train_plan.describe())  # type: ignore[union-attr]
    return trainer, model_path, trainable, total


def choose_pack_width(cfg: RunConfig, train_set: Any, model: Any, report: Callable[[str], None] | None) -> int:
    """The packed row width for this run, or 0 for padded batches (``data.packing``)."""
    import mlx.nn as nn

    from .packing import helps, pack_width

    mode = cfg.data.packing
    if mode == "off":
        return 0
    width = min(cfg.data.pack_length or pack_width(train_set, cfg.data.max_seq_length), cfg.data.max_seq_length)
    has_rope = any(isinstance(getattr(m, "rope", None), nn.Module) for _n, m in model.named_modules())
    if not has_rope:
        if mode == "on":
            raise ConfigError(f"{cfg.source or 'config'}: data.packing = \"on\" needs a model with rotary position "
                              "embeddings (positions restart per packed example); this one has none. Set it to \"auto\" or \"off\".")
        return 0
    if mode == "auto" and not helps(train_set, width):
        if report is not None:
            report(f"packing off: examples fill rows of {width} tokens on their own (data.packing = \"auto\")")
        return 0
    return width


def sample(trainer: Any, prompt: str, max_tokens: int, temperature: float, raw: bool = False) -> str:
    """Complete ``prompt`` with the weights as they are now (mlx-lm's generation).

    The prompt is formatted as the run's training data formatted its prompts (the chat template
    for chat data and for prompt/completion data on a tokenizer that has one, :func:`sampling_prompt`);
    ``raw`` sends the text as it is. Training state is untouched: the model goes back to train
    mode, the compiled step is a separate function, and the trainer reseeds mx.random before
    every step anyway.
    """
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model = trainer.model
    model.eval()
    try:
        tokens = sampling_prompt(trainer, prompt, raw)
        return str(generate(model, trainer.tokenizer, tokens, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)))
    finally:
        model.train()


def sampling_prompt(trainer: Any, prompt: str, raw: bool = False) -> list[int] | str:
    """What generation starts from: the prompt's tokens in the run's prompt format, or the raw text.

    Raw text goes to mlx-lm as a string, which tokenizes it as ``mlx_lm.generate
    --ignore-chat-template`` does.
    """
    from .data import prompt_tokens

    if raw:
        return prompt
    return prompt_tokens(trainer.tokenizer, prompt, trainer.prompt_format, trainer.row_format)
