"""``training.memory_budget_gb``: what the device offers, and the run's memory settings from it.

The planning itself is :func:`tunetop.training.memory_plan.plan_memory`, a pure function; this module
gathers its inputs (the device's memory, the model's shape, the rows of a step) and applies its
answer to the four settings it may choose: ``memory_limit_gb``, ``micro_batches``,
``ce_chunk_tokens`` and the recomputing blocks. A setting the config gives (a cap above 0,
micro-batches above 0, a chunk above 0, ``grad_checkpoint = true``, or ``grad_checkpoint_blocks``
of 0 or more without it: none) is kept as given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunetop.training.config import ConfigError, RunConfig
from tunetop.training.memory_plan import GB, Fixed, MemoryPlan, ModelShape, Workload, plan_memory, size

GPU_SHARE = 0.9
"""Of what a GPU offers (a Mac's recommended working set, a CUDA card's free memory): the rest is
left to the system, the display and other processes."""
CPU_SHARE = 0.8
"""Of the RAM available at start on a machine without a GPU."""


@dataclass
class MemorySettings:
    """The settings a run trains with, and the plan they came from (None: the budget is off)."""

    memory_limit_gb: float
    ce_chunk_tokens: int
    grad_checkpoint: bool
    grad_checkpoint_blocks: int
    micro_batches: int = 0  # 0 or 1: one pass
    plan: MemoryPlan | None = None


def device_memory() -> tuple[float, str, bool]:
    """(bytes the run may use, where that figure comes from, whether a soft cap applies: a GPU).

    0 bytes when the device says nothing usable.
    """
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        info = _device_info(mx)
        recommended = int(info.get("max_recommended_working_set_size") or 0)
        if recommended:  # Apple silicon: unified memory, the GPU's recommended working set
            return recommended * GPU_SHARE, f"{GPU_SHARE:.0%} of the GPU's recommended working set, {size(recommended)}", True
        free = int(info.get("free_memory") or 0) or _nvidia_smi_free()
        if free:  # CUDA: what is free now, plus what this process already holds (the model)
            held = mx.get_active_memory()
            return free * GPU_SHARE + held, (f"{GPU_SHARE:.0%} of the GPU's {size(free)} free, plus the "
                                             f"{size(held)} this run holds"), True
        return 0.0, "the GPU does not report its memory", True
    available = _available_ram()
    if not available:
        return 0.0, "the system does not report its free memory", False
    held = mx.get_active_memory()
    return available * CPU_SHARE + held, f"{CPU_SHARE:.0%} of the {size(available)} of RAM available, no GPU", False


def _device_info(mx: Any) -> dict[str, Any]:
    for get in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        if get is not None:
            try:
                return dict(get())
            except Exception:  # an older MLX, another backend: try the next
                continue
    return {}


def _nvidia_smi_free() -> int:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i",
                              os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.split()[0]) * 2**20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def model_shape(model: Any) -> ModelShape | None:
    """The model's shape as the estimate needs it; None when it cannot be read (no ``layers``)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tunetop.training.adapters import count_parameters
    from tunetop.training.chunked_loss import head_of

    args = getattr(model, "args", None)
    layers = getattr(model, "layers", None)

    def arg(*names: str) -> int:
        for name in names:
            value = getattr(args, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 0

    hidden = arg("hidden_size", "n_embd", "d_model", "dim")
    if args is None or layers is None or not hidden:
        return None
    heads = arg("num_attention_heads", "n_head", "n_heads") or max(hidden // 128, 1)
    vocab = arg("vocab_size")
    intermediate = arg("intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden
    trainable: list[Any] = [v for _, v in tree_flatten(model.trainable_parameters())]  # type: ignore[misc,str-unpack]
    weights: list[Any] = [v for _, v in tree_flatten(model.parameters())]  # type: ignore[misc,str-unpack]
    trainable_ids = {id(v) for v in trainable}
    # The compute dtype: the commonest float dtype of the frozen weights (a quantized model's scales).
    by_size: dict[int, int] = {}
    for v in weights:
        if v.dtype in (mx.bfloat16, mx.float16, mx.float32) and id(v) not in trainable_ids:
            by_size[v.dtype.size] = by_size.get(v.dtype.size, 0) + v.size
    activation_bytes = max(by_size, key=by_size.__getitem__, default=4)
    _, parameters = count_parameters(model)
    return ModelShape(
        layers=len(layers),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        vocab=vocab,
        parameters=parameters,
        weight_bytes=sum(v.nbytes for v in weights),
        trainable_bytes=sum(v.nbytes for v in trainable),
        activation_bytes=activation_bytes,
        chunkable_head=head_of(model) is not None,
    )


def step_width(cfg: RunConfig, train_set: Any, pack_width: int) -> int:
    """Input positions of the widest training batch: a packed row, or the bucket of the longest example."""
    from tunetop.training.data import bucket_width

    longest = max((len(e.tokens) for e in train_set.examples), default=1)
    padded = bucket_width(longest, cfg.data.max_seq_length) - 1
    return pack_width if pack_width and longest <= pack_width + 1 else max(pack_width, padded)


def fixed_settings(cfg: RunConfig, layers: int) -> Fixed:
    """The settings the config gives, which the plan keeps (README, ``memory_budget_gb``)."""
    t = cfg.training
    blocks: int | None = None
    if t.grad_checkpoint:
        blocks = layers if t.grad_checkpoint_blocks < 0 else min(t.grad_checkpoint_blocks, layers)
    elif t.grad_checkpoint_blocks >= 0:  # a count without grad_checkpoint recomputes nothing, as it always did
        blocks = 0
    return Fixed(
        memory_limit_gb=t.memory_limit_gb if t.memory_limit_gb > 0 else None,
        ce_chunk_tokens=t.ce_chunk_tokens if t.ce_chunk_tokens > 0 else None,
        recompute_blocks=blocks,
        micro_batches=t.micro_batches if t.micro_batches > 0 else None,
    )


REFUSE_OVER = 2.0
"""A run whose leanest step is estimated past this multiple of its budget is refused at start."""


def as_configured(cfg: RunConfig) -> MemorySettings:
    """The settings as the config writes them (the budget off)."""
    t = cfg.training
    return MemorySettings(t.memory_limit_gb, t.ce_chunk_tokens, t.grad_checkpoint, t.grad_checkpoint_blocks, t.micro_batches)


def plan_run(
    cfg: RunConfig,
    model: Any,
    train_set: Any,
    pack_width: int,
    ranks: int = 1,
    report: Callable[[str], None] | None = None,
) -> MemorySettings:
    """The run's memory settings from ``training.memory_budget_gb``, saying at start what was chosen and why."""
    import mlx.core as mx

    t = cfg.training
    say = report or (lambda _line: None)
    budget = t.memory_budget_gb
    if budget == 0:
        return as_configured(cfg)
    if budget == "auto":
        budget_bytes, source, cap_applies = device_memory()
        where = f"auto: {source}"
    else:
        budget_bytes, where, cap_applies = float(budget) * GB, "training.memory_budget_gb", mx.default_device().type == mx.gpu
    shape = model_shape(model)
    if shape is not None and t.loss:  # a custom loss scores full logits (tunetop.training.trainer)
        shape = dataclasses.replace(shape, chunkable_head=False)
    if not budget_bytes or shape is None:
        why = "the model's shape cannot be read" if shape is None else where
        say(f"memory budget: none ({why}); memory_limit_gb, micro_batches, ce_chunk_tokens and grad_checkpoint as configured")
        return as_configured(cfg)
    width = step_width(cfg, train_set, pack_width)
    cuda = mx.default_device().type == mx.gpu and bool(getattr(mx, "cuda", None)) and mx.cuda.is_available()
    work = Workload(
        rows=max(t.batch_size // max(ranks, 1), 1),
        width=width,
        packed=pack_width > 0,
        fused_attention=cuda and width % 128 == 0,  # MLX's cuDNN attention; Metal and the CPU train unfused
        optimizer_states={"adam": 2, "adamw": 2, "sgd": 1 if cfg.optimizer.momentum else 0}.get(cfg.optimizer.name, 0),
        accumulation=t.grad_accumulation_steps > 1,
        float32_lora_products=cfg.lora.fine_tune_type != "full" and not cfg.lora.model_precision,
    )
    plan = plan_memory(shape, work, budget_bytes, cap_applies, fixed_settings(cfg, shape.layers))
    say(f"memory budget {size(budget_bytes)} ({where}): {plan.describe()}")
    if plan.need.total > REFUSE_OVER * budget_bytes:
        # Far past anything the cap can throttle: starting would end in an allocation failure
        # (a crash in MLX, no save) minutes later, so say it now, with what to change.
        raise ConfigError(
            f"a training step needs about {size(plan.need.total)} even with the leanest memory settings, more "
            f"than {REFUSE_OVER:g}x the memory budget of {size(budget_bytes)} ({where}). Lower training.batch_size, "
            "data.max_seq_length or lora.rank (or lora.num_layers), or set training.memory_budget_gb higher "
            "(0 starts without a budget, at your own risk)."
        )
    blocks = plan.recompute_blocks
    return MemorySettings(plan.memory_limit_gb, plan.ce_chunk_tokens, blocks > 0, blocks if blocks else -1,
                          plan.micro_batches, plan)
