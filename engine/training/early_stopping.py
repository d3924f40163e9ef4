"""Early stopping: the best validation loss so far, and how many validations have not beaten it.

Pure logic, no mlx: the trainer folds each scheduled validation in (:meth:`EarlyStopping.observe`)
and keeps the tracker's state in every checkpoint, so a resumed run counts on exactly where the
interrupted one stood (an exact resume ends early at the same iteration).

As Keras' ``EarlyStopping``: a validation improves when its loss is below the best by more than
``min_delta``; only an improvement moves the best (a smaller gain is a validation without one).
The best is tracked with patience 0 too, so patience set live counts from the best so far.

That reference (``best_*``) is what patience counts from; what a run reports as its best
(``lowest_*``: the finished event, the log) is the lowest validation loss seen, the one the best
checkpoint, the dashboard and ``compare`` name too. With min_delta > 0 they can differ: a smaller
gain lowers the loss without resetting the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Patience (validations without an improvement that end the run; 0 = never) and the count."""

    patience: int = 0
    min_delta: float = 0.0
    best_loss: float | None = None
    best_iteration: int | None = None
    waited: int = 0  # validations since the best that did not improve on it
    lowest_loss: float | None = None
    lowest_iteration: int | None = None

    def observe(self, iteration: int, loss: float) -> bool:
        """Fold in one validation; True when the run should end (patience spent)."""
        if math.isfinite(loss) and (self.lowest_loss is None or loss < self.lowest_loss):
            self.lowest_loss, self.lowest_iteration = loss, iteration
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_iteration, self.waited = loss, iteration, 0
        else:
            self.waited += 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the settings come from the config, which may change on resume)."""
        return {"best_loss": self.best_loss, "best_iteration": self.best_iteration, "waited": self.waited,
                "lowest_loss": self.lowest_loss, "lowest_iteration": self.lowest_iteration}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take a checkpoint's state; None (a checkpoint of an older version) starts afresh."""
        if not state:
            return
        self.best_loss = state.get("best_loss")
        self.best_iteration = state.get("best_iteration")
        self.waited = int(state.get("waited") or 0)
        self.lowest_loss = state.get("lowest_loss", self.best_loss)  # older checkpoints kept only the reference
        self.lowest_iteration = state.get("lowest_iteration", self.best_iteration)

    def describe(self) -> str:
        """The sentence a run that stopped early logs."""
        best = f"{self.lowest_loss:.4f}" if self.lowest_loss is not None else "none"
        validations = "validation" if self.waited == 1 else "validations"
        return (
            f"early stopping: {self.waited} {validations} in a row without an improvement of more than "
            f"{self.min_delta:g} (training.early_stopping_patience = {self.patience}); the best validation "
            f"loss was {best} at iteration {self.lowest_iteration}"
        )

