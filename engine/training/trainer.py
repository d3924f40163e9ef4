"""The training loop, with mlx-swift-lm's ``LoRATrain`` semantics in Python form.

Read top to bottom: the parameters, the progress events a callback receives, the default
length-masked loss, ``evaluate``, the :class:`Trainer` (one compiled step, validation, save),
and ``train``, the loop that ties them together.

The progress callback sees ``Train``, ``Validation`` and ``Save`` events and returns
``Disposition.STOP`` or ``Disposition.MORE``; returning STOP ends the run right after the
event that returned it (the adapter is still saved). An optional ``control`` hook runs between
steps: the engine uses it to apply commands (pause, save, evaluate, set) without the loop
knowing about sockets.

Longer than most modules on purpose: a newcomer reads the loop top to bottom in one sitting, as
nanoGPT's train.py (the losses, packing, adapters and checkpoints it calls live elsewhere).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tunetop.training import config as config_module
from tunetop.training.adapters import describe_fine_tuning, prune_numbered, save_adapters, trainable_weights
from tunetop.training.chunked_loss import summed_cross_entropy
from tunetop.training.config import RunConfig
from tunetop.training.data import Batch, BatchPlan, Dataset
from tunetop.training.early_stopping import EarlyStopping
from tunetop.training.optimizers import Schedule
from tunetop.training.packing import (
    PackedBatch,
    PackPlan,
    packed_custom_loss,
    packed_loss,
    prepare_model,
    runs_packed,
)

FROM_CONFIG: dict[str, tuple[str, str]] = {
    "batch_size": ("training", "batch_size"),
    "iterations": ("training", "iterations"),
    "steps_per_report": ("training", "steps_per_report"),
    "steps_per_eval": ("training", "steps_per_eval"),
    "validation_batches": ("training", "validation_batches"),  # 0 = the whole validation set
    "save_every": ("checkpoints", "save_every"),
    "max_seq_length": ("data", "max_seq_length"),
    "grad_checkpoint": ("training", "grad_checkpoint"),
    "grad_checkpoint_blocks": ("training", "grad_checkpoint_blocks"),  # how many blocks recompute, from the first; -1 = all
    "grad_accumulation_steps": ("training", "grad_accumulation_steps"),
    "seed": ("training", "seed"),
    "keep_last": ("checkpoints", "keep_last"),
    "on_nonfinite": ("training", "on_nonfinite"),  # pause | stop | skip: a NaN or infinite loss, gradient or update
    "early_stopping_patience": ("training", "early_stopping_patience"),  # validations without improvement; 0 = off
    "early_stopping_min_delta": ("training", "early_stopping_min_delta"),
    "ce_chunk_tokens": ("training", "ce_chunk_tokens"),  # > 0: cross-entropy this many positions at a time
    "clear_cache_gb": ("training", "clear_cache_gb"),  # >= 0: empty MLX's buffer cache past this many GB
    "memory_limit_gb": ("training", "memory_limit_gb"),  # > 0: mx.set_memory_limit (a soft cap)
    "micro_batches": ("training", "micro_batches"),  # > 1: a batch's rows in this many passes, one update
}
"""The parameters a run's config gives, and where each lives in it: the one mapping from config
to trainer (their defaults are the config's, their help is the config's)."""


def _default(name: str) -> Any:
    section, key = FROM_CONFIG[name]
    return next(f.default for f in dataclasses.fields(config_module.SECTIONS[section]) if f.name == key)


@dataclass
class TrainingParameters:
    """What ``LoRATrain.Parameters`` holds, plus the knobs the engine adds.

    The fields in :data:`FROM_CONFIG` come from a run's config (:meth:`from_config`); the rest
    are the run's places and what the engine worked out for it.
    """

    batch_size: int = _default("batch_size")
    iterations: int = _default("iterations")
    steps_per_report: int = _default("steps_per_report")
    steps_per_eval: int = _default("steps_per_eval")
    validation_batches: int = _default("validation_batches")
    save_every: int = _default("save_every")
    adapter_path: Path | None = None  # None: nothing is saved (as LoRATrain without an adapter URL)
    max_seq_length: int = _default("max_seq_length")
    grad_checkpoint: bool = _default("grad_checkpoint")
    grad_checkpoint_blocks: int = _default("grad_checkpoint_blocks")
    grad_accumulation_steps: int = _default("grad_accumulation_steps")
    seed: int = _default("seed")
    keep_last: int = _default("keep_last")
    adapter_config: dict[str, Any] = field(default_factory=dict)  # empty: read from the adapted model
    checkpoint_path: Path | None = None  # full-state checkpoints for exact resume; None = adapters only
    on_nonfinite: str = _default("on_nonfinite")
    early_stopping_patience: int = _default("early_stopping_patience")
    early_stopping_min_delta: float = _default("early_stopping_min_delta")
    # With "skip": this many unusable batches in a row pause the run (stop it without a control
    # hook), since skipping cannot recover from a learning rate that breaks every step.
    nonfinite_streak_limit: int = 10
    config_hash: str = ""
    config_values: dict[str, Any] = field(default_factory=dict)  # config.computation_values, kept in checkpoints
    pack_width: int = 0  # > 0: train on packed rows of this many tokens (tunetop.training.packing); 0 = padded batches
    ce_chunk_tokens: int = _default("ce_chunk_tokens")
    clear_cache_gb: float = _default("clear_cache_gb")
    memory_limit_gb: float = _default("memory_limit_gb")
    # > 1: each batch's rows go through the model in this many passes (micro-batches) whose
    # gradients are summed into the one update the whole batch gives; 0 or 1: one pass.
    micro_batches: int = _default("micro_batches")

    @classmethod
    def from_config(cls, cfg: RunConfig, **rest: Any) -> TrainingParameters:
        """The parameters of a run's config (:data:`FROM_CONFIG`); ``rest`` gives the others, and
        overrides what the engine works out for the run (the memory plan's settings)."""
        values = {name: getattr(getattr(cfg, section), key) for name, (section, key) in FROM_CONFIG.items()}
        values["config_values"] = config_module.computation_values(cfg)
        return cls(**{**values, **rest})


class Disposition(enum.Enum):
    """What the progress callback wants next."""

    STOP = "stop"
    MORE = "more"


@dataclass
class Train:
    """Training progress over the last report interval."""

    event_type: ClassVar[str] = "train"  # the protocol event it becomes (protocol.EVENT_FIELDS)
    iteration: int
    loss: float
    learning_rate: float
    iterations_per_second: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory: float  # GB


@dataclass
class Validation:
    """A validation pass: mean loss per token, and how long it took."""

    event_type: ClassVar[str] = "validation"  # the protocol event it becomes (protocol.EVENT_FIELDS)
    iteration: int
    loss: float
    seconds: float


@dataclass
class Save:
    """An adapter written to ``path``."""

    event_type: ClassVar[str] = "save"  # the protocol event it becomes (protocol.EVENT_FIELDS)
    iteration: int
    path: str
    kind: str = "adapter"
    checkpoint: str = ""  # the full-state checkpoint folder written with it, if any
    removed: list[int] = field(default_factory=list)  # iterations whose checkpoints retention deleted with this save


@dataclass
class NonFinite:
    """A step that could not be used: its loss, gradients or update were NaN or infinite.

    The update is always undone, so the weights stay those before the batch (finite);
    ``action`` is what happens next.
    """

    event_type: ClassVar[str] = "nonfinite"  # the protocol event it becomes (protocol.EVENT_FIELDS)
    iteration: int
    loss: float
    epoch: int
    batch: int  # index of the batch within its epoch's order
    action: str  # "skipped" (training goes on), or the policy to apply: "pause", "stop"
    cause: str = "loss"  # "loss", "gradients" (finite loss), or "update" (it would break the weights)
    streak: int = 1  # unusable steps in a row, this one included


@dataclass
class SaveFailed:
    """A save that could not be written (disk full, read-only folder...); nothing was damaged."""

    iteration: int
    error: str


Progress = Train | Validation | Save | NonFinite | SaveFailed
ProgressCallback = Callable[[Progress], "Disposition | None"]
LossFunction = Callable[[nn.Module, mx.array, mx.array], tuple[mx.array, mx.array]]


def default_loss(
    model: nn.Module, tokens: mx.array, lengths: mx.array, ce_chunk_tokens: int = 0, segments: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Cross-entropy over real tokens only; returns (mean loss, token count).

    ``lengths`` holds ``(offset, length)`` per row: targets before ``offset`` (a masked
    prompt) and at or past ``length`` (padding) do not count. On packed rows (``segments``
    given, tunetop.training.custom_loss) it is the 0/1 mask of counted targets instead. ``ce_chunk_tokens``
    > 0 scores the vocabulary that many positions at a time (tunetop.training.chunked_loss).
    """
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:]
    if segments is not None:
        mask = lengths
    else:
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    count = mask.sum()
    total = summed_cross_entropy(model, inputs, targets, mask, ce_chunk_tokens)
    return total / count, count


def evaluate(
    model: nn.Module,
    dataset: Dataset | BatchPlan,
    batch_size: int = 4,
    batch_count: int = 0,
    max_seq_length: int = 2048,
    loss: LossFunction = default_loss,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Mean per-token loss over ``batch_count`` batches (0 = the whole dataset); ``progress`` is
    called with (batches done, batches in all) after each batch."""
    plan = (
        dataset
        if isinstance(dataset, BatchPlan)
        else BatchPlan(dataset, batch_size, max_seq_length, drop_last=False)
    )
    was_training = model.training
    model.eval()
    total = mx.array(0.0)
    count = mx.array(0)
    batches = len(plan.batches) if batch_count <= 0 else min(batch_count, len(plan.batches))
    for done, batch in enumerate(plan.fixed_sample(batch_count), start=1):
        value, tokens = loss(model, mx.array(batch.tokens), mx.array(batch.lengths))
        total = total + value * tokens
        count = count + tokens
        mx.eval(total, count)
        if progress is not None:
            progress(done, batches)
    if was_training:
        model.train()
    return float((total / count).item()) if count.item() else float("nan")  # type: ignore[arg-type]


def grad_checkpoint(model: nn.Module, blocks: int = -1) -> int:
    """Recompute the activations of the model's first ``blocks`` transformer blocks (-1 = all) in
    the backward pass (mx.checkpoint); returns how many blocks now recompute.

    Each chosen block becomes an instance of a subclass of its own class whose ``__call__`` is
    checkpointed: parameter names and ``isinstance`` checks are unchanged, other blocks (and other
    models in the process) are not touched, and a second call changes nothing. Every block holds
    about the same activations, so which ones recompute does not matter, only how many: each one
    saves its activations' memory for one more forward pass of its own.
    """
    layers = model.layers  # type: ignore[attr-defined]
    chosen = list(layers) if blocks < 0 else list(layers)[:blocks]
    for layer in chosen:
        layer.__class__ = _recomputing_class(type(layer))
    return len(chosen)


_RECOMPUTING: dict[type, type] = {}


def _recomputing_class(cls: type) -> type:
    """``cls`` with a checkpointed ``__call__`` (made once per class)."""
    if getattr(cls, "recomputes_activations", False):
        return cls
    if cls not in _RECOMPUTING:
        forward = cls.__call__  # type: ignore[operator]

        def checkpointed(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> Any:
            # Only the parameters and the hidden state are differentiated: the rest (an attention
            # mask array, a packed batch's cache) are constants, and MLX's fused attention has no
            # gradient with respect to a mask.
            def inner(params: Any, hidden: mx.array) -> Any:
                self.update(params)
                return forward(self, hidden, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        namespace = {"__call__": checkpointed, "recomputes_activations": True, "__module__": cls.__module__}
        _RECOMPUTING[cls] = type(f"Recomputing{cls.__name__}", (cls,), namespace)
    return _RECOMPUTING[cls]


def seed_everything(seed: int) -> None:
    """Seed every random stream a run can draw from: ``mlx.random``, Python's and numpy's global ones.

    Called right before the LoRA weights are drawn, so a seed fixes the run whatever the process
    drew before (building the embedded model in the same process, a library user's own draws).
    """
    mx.random.seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class Shard:
    """This process's share of a data-parallel run: ``rank`` of ``size`` in ``group``.

    Every rank walks the same global batch order and trains on its own contiguous block of
    rows; gradients and losses are summed over the group inside the compiled step.
    """

    group: Any  # mx.distributed.Group
    rank: int
    size: int

    def rows(self, batch: Any) -> Any:
        """This rank's block of a global batch (the batch size divides evenly; checked at start)."""
        per_rank = len(batch.tokens) // self.size
        return batch.rows(self.rank * per_rank, (self.rank + 1) * per_rank)


def split_rows(batch: Any, micro_batches: int) -> list[Any]:
    """A batch's rows in ``micro_batches`` contiguous blocks (sizes differ by at most one), or the batch whole."""
    rows = len(batch.tokens)
    parts = max(1, min(micro_batches, rows))
    if parts == 1:
        return [batch]
    bounds = [rows * k // parts for k in range(parts + 1)]
    return [batch.rows(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]


@dataclass
class StepResult:
    loss: float
    tokens: int


class Trainer:
    """Owns the model, optimizer, data position and compiled step of one run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        train_set: Dataset,
        valid_set: Dataset | None,
        parameters: TrainingParameters,
        schedule: Schedule,
        loss: LossFunction = default_loss,
        shard: Shard | None = None,
    ) -> None:
        self.model = model
        self.shard = shard if shard is not None and shard.size > 1 else None
        self.optimizer = optimizer
        self.parameters = parameters
        self.schedule = schedule
        self.loss = loss
        self.train_plan: BatchPlan | PackPlan
        if parameters.ce_chunk_tokens > 0 and loss is default_loss:
            loss = partial(default_loss, ce_chunk_tokens=parameters.ce_chunk_tokens)
            self.loss = loss
        self.train_loss: Callable[..., tuple[mx.array, mx.array]] = loss
        if parameters.pack_width > 0:
            # Validation stays unpacked, with ``loss``.
            self.train_plan = PackPlan(
                train_set, parameters.batch_size, parameters.pack_width, parameters.seed, parameters.max_seq_length
            )
            prepare_model(model)
            if self.loss is default_loss or getattr(self.loss, "func", None) is default_loss:
                self.train_loss = partial(packed_loss, ce_chunk_tokens=parameters.ce_chunk_tokens)
            else:
                from tunetop.training.custom_loss import accepts_segments

                if not accepts_segments(self.loss):
                    raise ValueError(
                        "a custom loss trains packed rows only if it takes the example boundaries: add a "
                        "segments=None parameter (tunetop.training.custom_loss), or set pack_width=0"
                    )
                if not runs_packed(model):
                    raise ValueError("this model's blocks take no cache argument: a custom loss cannot run it packed")
                self.train_loss = packed_custom_loss(self.loss)
        else:
            self.train_plan = BatchPlan(train_set, parameters.batch_size, parameters.max_seq_length, parameters.seed)
        self.valid_plan = (
            BatchPlan(valid_set, parameters.batch_size, parameters.max_seq_length, parameters.seed, drop_last=False)
            if valid_set is not None
            else None
        )
        self.iteration = 0
        self.trained_tokens = 0
        self.epoch = 0
        self.position = 0
        self.learning_rate = schedule(0)
        self.learning_rate_override: float | None = None
        self.last_validation_loss: float | None = None
        self.last_validation_iteration: int | None = None  # the weights last_validation_loss was measured on
        self.early_stopping = EarlyStopping(parameters.early_stopping_patience, parameters.early_stopping_min_delta)
        self.last_nonfinite: NonFinite | None = None
        self.nonfinite_streak = 0  # unusable steps in a row (tunetop.training.trainer.NonFinite)
        self.journal_seq: Callable[[], int] = lambda: 0
        self.tokenizer: Any = None  # set by whoever builds the trainer, for samples
        self.prompt_format = train_set.prompt_format  # how the training data put its prompts, for samples
        self.row_format = train_set.row_format  # and how its rows were read (the chat template)
        # Runs first in every step, with the learning rate chosen: a distributed run's rank 0
        # tells the other ranks here which step to take.
        self.before_step: Callable[[Trainer], None] | None = None
        self._batches: Iterator[tuple[int, int, Batch | PackedBatch]] | None = None
        self._accumulated: Any = None
        if parameters.grad_checkpoint:
            grad_checkpoint(model, parameters.grad_checkpoint_blocks)
        self._mlx_memory_limit = mx.get_memory_limit()  # what memory_limit_gb = 0 restores
        self.apply_memory_limit()
        mx.random.seed(parameters.seed)
        self._step = self._compile_step()
        model.train()

    def _compile_step(self) -> Callable[..., Any]:
        loss_and_grad = nn.value_and_grad(self.model, self.train_loss)
        accumulation = self.parameters.grad_accumulation_steps
        state = [self.model.state, self.optimizer.state, mx.random.state]

        shard = self.shard

        @partial(mx.compile, inputs=state, outputs=state)
        def step(previous: Any, pending: Any, update: bool, split: bool, batch_done: bool, *batch: mx.array) -> Any:
            """One pass: ``previous`` sums the step's finished batches' mean gradients (None at the
            first); ``pending`` is (token-weighted gradient sum, tokens) of this batch's earlier
            micro-batches when ``split``; ``batch_done``: the batch's last pass; ``update``: the step's."""
            (value, count), grad = loss_and_grad(self.model, *batch)
            if shard is not None:
                value, count, grad = _combine_ranks(value, count, grad, shard)
            if split:
                # The loss is a mean over every target token of the batch: a micro-batch's mean
                # gradient times its tokens is its summed loss's gradient; their sum divided by the
                # batch's tokens is the unsplit batch's gradient. A pass without tokens adds nothing.
                tokens = mx.where(count > 0, count, 0).astype(mx.float32)
                grad = tree_map(lambda g: mx.where(tokens > 0, g * tokens.astype(g.dtype), 0), grad)
                if pending is not None:
                    grad = tree_map(lambda a, b: a + b, grad, pending[0])
                    tokens = tokens + pending[1]
                if not batch_done:
                    return value, count, previous, (grad, tokens), mx.array([True, True])
                grad = tree_map(lambda g: g / tokens.astype(g.dtype), grad)
            if previous is not None:
                grad = tree_map(lambda a, b: a + b, grad, previous)
            # (gradients finite, weights finite after the update): a finite loss can still come
            # with an overflowing gradient, and a finite gradient times a huge learning rate can
            # overflow the weights. Either way the step's caller undoes the update.
            health = mx.array([True, True])
            if update:
                if accumulation > 1:
                    grad = tree_map(lambda g: g / accumulation, grad)
                grad_ok = _all_finite(grad)
                self.optimizer.update(self.model, grad)
                health = mx.stack([grad_ok, _all_finite(self.model.trainable_parameters())])
                grad = None
            return value, count, grad, None, health

        self._state = state
        return step

    def next_batch(self) -> Batch | PackedBatch:
        """The next training batch in the seeded order; remembers the position for resume."""
        if self._batches is None:
            self._batches = self.train_plan.iterate(self.epoch, self.position)
        epoch, index, batch = next(self._batches)
        self.epoch, self.position = epoch, index + 1
        return batch

    def apply_memory_limit(self) -> None:
        """Set MLX's memory limit from ``parameters.memory_limit_gb`` (0: MLX's own default).

        A soft cap for the whole process: when a step's queued work would take MLX past it, MLX
        stops queueing and waits for the device to finish (and free) earlier work; a step that
        needs more still runs.
        """
        gb = self.parameters.memory_limit_gb
        mx.set_memory_limit(int(gb * 1e9) if gb > 0 else self._mlx_memory_limit)

    def set_learning_rate(self, rate: float) -> None:
        """From now on a constant rate (a live ``set``); kept in checkpoints."""
        self.learning_rate_override = rate
        self.schedule = lambda _step: rate

    def apply_live(self, key: str, value: Any) -> None:
        """One live change (a key of config.LIVE_FIELDS, value checked by config.coerce_live).

        The one place a change reaches the trainer: the engine's ``set`` and the orders rank 0
        sends its followers both come here. ``learning_rate`` becomes a constant rate from now
        on (the user took the wheel from the schedule); ``memory_limit_gb`` goes to MLX, and is
        put back if MLX refuses it (the error is raised); the others are read every step.
        """
        if key == "learning_rate":
            self.set_learning_rate(float(value))
        elif key == "memory_limit_gb":
            before = self.parameters.memory_limit_gb
            self.parameters.memory_limit_gb = value
            try:
                self.apply_memory_limit()
            except Exception:
                self.parameters.memory_limit_gb = before
                self.apply_memory_limit()
                raise
        elif key in FROM_CONFIG:
            setattr(self.parameters, key, value)
            self.early_stopping.patience = self.parameters.early_stopping_patience
            self.early_stopping.min_delta = self.parameters.early_stopping_min_delta
        else:
            raise KeyError(f"{key} is not a live setting")

    def step(self) -> StepResult:
        """One optimizer step (of ``grad_accumulation_steps`` micro-batches)."""
        self.learning_rate = self.schedule(self.iteration)
        if self.before_step is not None:
            self.before_step(self)
        self.optimizer.learning_rate = mx.array(self.learning_rate, dtype=mx.float32)
        # Randomness (dropout) of step k depends on (seed, k, rank) alone, so a resumed run draws
        # the same numbers as an uninterrupted one without saving the generator's state.
        rank = self.shard.rank if self.shard else 0
        mx.random.seed((self.parameters.seed * 1_000_003 + self.iteration + rank * 7_919_009) % 2**32)
        # MLX arrays are immutable: holding the current leaves costs nothing and lets a
        # non-finite step be undone.
        before_model = tree_flatten(self.model.trainable_parameters())
        before_optimizer = tree_flatten(self.optimizer.state)
        accumulation = self.parameters.grad_accumulation_steps
        total_loss = 0.0
        total_tokens = 0
        for index in range(accumulation):
            batch = self.next_batch()
            if self.shard is not None:
                batch = self.shard.rows(batch)
            parts = split_rows(batch, self.parameters.micro_batches)
            pending = None
            for number, part in enumerate(parts):
                last = number == len(parts) - 1
                value, count, self._accumulated, pending, health = self._step(
                    self._accumulated, pending, last and index == accumulation - 1, len(parts) > 1, last, *part.arrays()
                )
                # Evaluated pass by pass: a micro-batch's activations are freed before the next one's.
                mx.eval(self._state, value, count, self._accumulated, pending, health)
                tokens = int(count.item())
                if tokens or len(parts) == 1:  # a pass without tokens (its mean is NaN) adds nothing
                    total_loss += value.item() * tokens
                total_tokens += tokens
        self.iteration += 1
        loss = total_loss / max(total_tokens, 1)
        grad_ok, weights_ok = (bool(flag) for flag in health.tolist())  # type: ignore[union-attr]
        self.last_nonfinite = None
        if not (math.isfinite(loss) and grad_ok and weights_ok):
            # Undone whatever the policy: the weights never hold NaN or infinity, so a pause can be
            # resumed (with a lower learning rate) and every save stays possible.
            self.model.update(tree_unflatten(before_model))
            # State the step created (MLX makes it at the first update) goes back to its initial
            # zeros: left as the bad step made it, NaN moments poisoned every later update.
            restored = list(cast(list[tuple[str, Any]], before_optimizer))
            existed = {key for key, _ in restored}
            now = cast(list[tuple[str, Any]], tree_flatten(self.optimizer.state))
            restored += [(key, mx.zeros_like(value)) for key, value in now if key not in existed]
            _assign_in_place(self.optimizer.state, tree_unflatten(restored))
            self._accumulated = None
            self.nonfinite_streak += 1
            cause = "loss" if not math.isfinite(loss) else "gradients" if not grad_ok else "update"
            action = self.parameters.on_nonfinite
            if action == "skip":
                action = "skipped"
                if self.nonfinite_streak >= self.parameters.nonfinite_streak_limit:
                    action = "pause"
            self.last_nonfinite = NonFinite(
                self.iteration, loss, self.epoch, self.position - 1, action, cause, self.nonfinite_streak
            )
            if action == "pause":
                self.nonfinite_streak = 0  # a resumed run gets the full allowance again
            return StepResult(loss, 0)
        self.nonfinite_streak = 0
        self.trained_tokens += total_tokens
        # MLX keeps freed buffers for reuse. Emptying that cache also lowered a step's peak on the
        # H200 (19.6 -> 13.5 GB at 8 x 512 tokens): every allocation then goes to the driver,
        # which holds back the host queueing work ahead of the GPU, and queued work keeps the
        # buffers it will free. memory_limit_gb bounds that directly, for less speed
        # (docs/PERFORMANCE.md); this setting stays for mlx-lm's recipes and shared machines.
        limit = self.parameters.clear_cache_gb
        if limit >= 0:
            del before_model, before_optimizer  # the previous weights: free them first
            if mx.get_cache_memory() > limit * 1e9:
                mx.clear_cache()
        return StepResult(loss, total_tokens)

    def validate(self) -> Validation | None:
        """Validation on ``validation_batches`` batches (0 = all); None without a validation set."""
        if self.valid_plan is None:
            return None
        start = time.perf_counter()
        value = evaluate(self.model, self.valid_plan, batch_count=self.parameters.validation_batches, loss=self.loss)
        self.last_validation_loss, self.last_validation_iteration = value, self.iteration
        return Validation(self.iteration, value, time.perf_counter() - start)

    def weights_finite(self) -> bool:
        return all(bool(mx.all(mx.isfinite(v)).item()) for v in trainable_weights(self.model).values())

    @property
    def saves(self) -> bool:
        """Whether :meth:`save` writes anything (an adapter path or a checkpoint path is set)."""
        return self.parameters.adapter_path is not None or self.parameters.checkpoint_path is not None

    def save(self) -> Save:
        """Write the adapter (mlx-lm layout, numbered copy beside it) and a full checkpoint.

        Refuses (``CheckpointError``) when the weights hold NaN or infinity, so the last good
        checkpoint is never replaced by a broken one.
        """
        from tunetop.training.checkpoint import CheckpointError

        if not self.weights_finite():
            raise CheckpointError(f"not saved at iteration {self.iteration}: the weights hold NaN or infinity")
        try:
            return self._save()
        except RuntimeError as error:  # mlx reports a failed write (disk full...) as RuntimeError
            raise CheckpointError(f"writing failed at iteration {self.iteration}: {error}") from None

    def _save(self) -> Save:
        from tunetop.training.checkpoint import (
            TrainerState,
            checkpoint_iteration,
            list_checkpoints,
            prune,
            write_checkpoint,
        )

        p = self.parameters
        path = ""
        if p.adapter_path is not None:
            adapter_config = p.adapter_config or describe_fine_tuning(self.model)
            path = str(save_adapters(self.model, p.adapter_path, adapter_config, iteration=self.iteration))
        if p.checkpoint_path is None:
            pruned = prune_numbered(p.adapter_path, p.keep_last) if p.adapter_path is not None else []
            return Save(self.iteration, path, removed=[iteration for iteration, _path in pruned])
        state = TrainerState(
            iteration=self.iteration,
            trained_tokens=self.trained_tokens,
            epoch=self.epoch,
            position=self.position,
            learning_rate_override=self.learning_rate_override,
            validation_loss=self.last_validation_loss,
            validation_iteration=self.last_validation_iteration,
            early_stopping=self.early_stopping.state(),
            seq=self.journal_seq(),
            config_hash=p.config_hash,
            saved_at=time.time(),
            config=p.config_values,
        )
        folder = write_checkpoint(p.checkpoint_path, state, trainable_weights(self.model), self.optimizer.state)
        gone = {checkpoint_iteration(folder) for folder in prune(p.checkpoint_path, p.keep_last)}
        # The numbered adapter copies follow the checkpoints (the best one stays with its checkpoint).
        kept = {checkpoint_iteration(folder) for folder in list_checkpoints(p.checkpoint_path)}
        removed = sorted(gone - kept)  # an iteration with a later save there (0000005.1) still exists
        if p.adapter_path is not None:
            prune_numbered(p.adapter_path, p.keep_last, keep=kept)
        # The event says what retention deleted, so a client (perhaps on another machine) lists what exists.
        return Save(self.iteration, path, checkpoint=str(folder), removed=removed)

    def restore(self, folder: Path) -> Any:
        """Continue from a full checkpoint: weights, optimizer, position, counters. Returns its state."""
        from tunetop.training.checkpoint import read_checkpoint

        state, weights, optimizer_state = read_checkpoint(folder)
        self.install(weights, optimizer_state)
        self.set_counters(state.iteration, state.trained_tokens, state.epoch, state.position, state.learning_rate_override)
        self.last_validation_loss = state.validation_loss
        self.last_validation_iteration = state.validation_iteration
        self.early_stopping.restore(state.early_stopping)
        return state

    def install(self, weights: dict[str, mx.array], optimizer_state: dict[str, mx.array]) -> None:
        """Take trainable weights and a flattened optimizer state (a checkpoint's, or rank 0's)."""
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(optimizer_state.items()))
        self.optimizer.init(self.model.trainable_parameters())
        self._accumulated = None
        self._step = self._compile_step()  # the compiled step captured the old optimizer state
        mx.eval(self.model.parameters(), self.optimizer.state)

    def set_counters(
        self, iteration: int, trained_tokens: int, epoch: int, position: int, learning_rate_override: float | None
    ) -> None:
        """Where training stands: step count, tokens, data position, a live learning rate."""
        self.iteration = iteration
        self.trained_tokens = trained_tokens
        self.epoch, self.position = epoch, position
        self._batches = None
        if learning_rate_override is not None:
            self.set_learning_rate(learning_rate_override)


@dataclass
class TrainResult:
    """How a ``train`` call ended."""

    iteration: int
    reason: str  # "completed", "stopped", "non_finite", "early_stopped"


class Meter:
    """Accumulates steps between reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.loss_sum += result.loss * result.tokens
        self.tokens += result.tokens
        self.steps += 1
        self.seconds += seconds

    def report(self, trainer: Trainer) -> Train:
        seconds = max(self.seconds, 1e-9)
        return Train(
            iteration=trainer.iteration,
            loss=self.loss_sum / max(self.tokens, 1),
            learning_rate=trainer.learning_rate,
            iterations_per_second=self.steps / seconds,
            tokens_per_second=self.tokens / seconds,
            trained_tokens=trainer.trained_tokens,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


def _combine_ranks(value: mx.array, count: mx.array, grad: Any, shard: Shard) -> tuple[mx.array, mx.array, Any]:
    """Per-token mean loss and gradient over all ranks' rows, as one process would compute them.

    Each rank's loss is a mean over its own tokens; weighting by token count before summing
    makes the result the mean over every token of the global batch (not a mean of means).
    """
    total = mx.distributed.all_sum(count, group=shard.group)
    has_tokens = count > 0  # a rank whose rows are all masked contributes nothing (its mean is NaN)
    weight = mx.where(has_tokens, count.astype(mx.float32) / total, 0.0)
    loss = mx.distributed.all_sum(mx.where(has_tokens, value.astype(mx.float32), 0.0) * weight, group=shard.group)
    # average_gradients divides by the group size and batches small arrays into few messages.
    scale = weight * shard.size
    grad = nn.utils.average_gradients(tree_map(lambda g: mx.where(has_tokens, g * scale.astype(g.dtype), 0), grad), shard.group)
    return loss, total, grad


def _all_finite(tree: Any) -> mx.array:
    """One boolean: every array in ``tree`` holds finite values only."""
    ok = mx.array(True)
    for _name, leaf in tree_flatten(tree):  # type: ignore[misc,str-unpack]
        ok = mx.logical_and(ok, mx.isfinite(leaf).all())  # type: ignore[arg-type]
    return ok


def _assign_in_place(target: Any, source: Any) -> None:
    """Copy leaves of ``source`` into the nested dicts/lists of ``target`` without replacing them
    (the compiled step holds references to these containers)."""
    items = target.items() if isinstance(target, dict) else enumerate(target)
    for key, value in list(items):
        # Containers holding no arrays vanish in a flatten/unflatten round trip: nothing to copy.
        present = key in source if isinstance(source, dict) else key < len(source)
        if not present:
            continue
        new = source[key]
        if isinstance(value, (dict, list)):
            _assign_in_place(value, new)
        else:
            target[key] = new


def _save(trainer: Trainer, progress: ProgressCallback | None) -> bool:
    """Save, reporting a failure as an event instead of ending the run."""
    from tunetop.training.checkpoint import CheckpointError

    if not trainer.saves:  # no adapter path: nothing is saved, as LoRATrain without an adapter URL
        return False
    try:
        event: Progress = trainer.save()
    except (OSError, CheckpointError) as error:
        event = SaveFailed(trainer.iteration, str(error))
    return _emit(progress, event)


def _emit(progress: ProgressCallback | None, event: Progress) -> bool:
    """Send one event; True when the callback asked to stop."""
    return progress is not None and progress(event) is Disposition.STOP


def run_loop(
    trainer: Trainer,
    progress: ProgressCallback | None = None,
    control: Callable[[Trainer], Disposition | None] | None = None,
) -> TrainResult:
    """Train ``trainer`` from its current iteration to ``parameters.iterations``."""
    p = trainer.parameters
    meter = Meter()
    result = TrainResult(trainer.iteration, "completed")
    if trainer.iteration == 0 and (validation := trainer.validate()) is not None:
        trainer.early_stopping.observe(validation.iteration, validation.loss)  # the base model's loss: the first best
        if _emit(progress, validation):
            result.reason = "stopped"
            return result
    while trainer.iteration < p.iterations:
        if control is not None and control(trainer) is Disposition.STOP:
            result.reason = "stopped"
            break
        start = time.perf_counter()
        step = trainer.step()
        it = trainer.iteration
        result.iteration = it
        stop = False
        if trainer.last_nonfinite is not None:
            bad = trainer.last_nonfinite
            stop = _emit(progress, bad)
            if bad.action == "stop" or (bad.action == "pause" and control is None):
                result.reason = "non_finite"
                break
            if stop:
                result.reason = "stopped"
                break
            continue
        meter.add(step, time.perf_counter() - start)
        # Intervals are read each step: a live `set` takes effect at once.
        if it % p.steps_per_report == 0 or it == p.iterations:
            report = meter.report(trainer)
            meter.reset()
            stop = _emit(progress, report)
        if not stop and (it % p.steps_per_eval == 0 or it == p.iterations):
            validation = trainer.validate()
            if validation is not None:
                stop = _emit(progress, validation)
                if trainer.early_stopping.observe(validation.iteration, validation.loss) and not stop:
                    result.reason = "early_stopped"  # the save after the loop keeps this iteration's weights
                    break
        if not stop and it % p.save_every == 0 and it != p.iterations:
            stop = _save(trainer, progress)
        if stop:
            result.reason = "stopped"
            break
    if trainer.iteration > 0:  # the adapter is saved however the run ended
        _save(trainer, progress)
    return result


def train(
    model: nn.Module,
    train: Dataset,
    validate: Dataset | None,
    optimizer: Any,
    tokenizer: Any = None,
    parameters: TrainingParameters | None = None,
    loss: LossFunction = default_loss,
    progress: ProgressCallback | None = None,
    schedule: Schedule | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (already adapted, e.g. by ``apply_fine_tuning``) as ``LoRATrain.train`` does.

    ``tokenizer`` is accepted for parity with the seed's signature; data arrives tokenized.
    Without a ``schedule`` the optimizer's initial learning rate is held constant.
    """
    parameters = parameters or TrainingParameters()
    if schedule is None:
        rate = float(np.asarray(optimizer.learning_rate))
        schedule = lambda _step: rate  # noqa: E731
    trainer = Trainer(model, optimizer, train, validate, parameters, schedule, loss)
    return run_loop(trainer, progress)
