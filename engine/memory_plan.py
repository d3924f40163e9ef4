"""How a run fits a memory budget: the memory cap, chunked cross-entropy and recomputing blocks.

A pure function of numbers (no mlx, no I/O): the model's shape, the rows of a step, the budget
in bytes and which settings the config fixed. :func:`plan_memory` estimates what a step needs
(:func:`step_need`) and walks a ladder of settings, each saving more memory than the one before,
from nothing (the fastest step) to every block recomputing with chunked cross-entropy; it takes
the first rung whose estimate fits. The ladder is ordered once by what each measure saves per
unit of speed it costs, so a tighter budget never chooses fewer recomputing blocks or drops the
chunking. ``engine/memory_budget.py`` reads the device and the model into these inputs.

The estimate is calibrated on the H200 figures of docs/PERFORMANCE.md (Llama-3.2-1B's shape,
bf16): 8 rows of 512 need ~13 GB; 4 packed rows of 2048 need ~22 GB with full logits and ~20 GB
with ``ce_chunk_tokens = 2048``; with 6 or 8 of 16 blocks recomputing they fit a 15 GB cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9

# Saved activations of one transformer block, per token, in activation-sized elements: the inputs
# of the adapted projections, norms, attention output, the MLP's gate/up/product. Fitted: 4 packed
# rows of 2048 on the 1B shape need 20.0 GB with chunked logits, 8 x 512 rows 13 GB.
ACTIVATION_HIDDEN = 6
ACTIVATION_INTERMEDIATE = 5
# mlx-lm's float32 LoRA products (lora.model_precision = false) keep a float32 copy of each adapted
# layer's input; with compilation about half of it survives (49.6 -> 56.8 GB at 8 x 2048).
FLOAT32_LORA_HIDDEN = 3
FLOAT32_LORA_INTERMEDIATE = 1
# The logits, their float32 softmax and gradient: bytes per (position x vocabulary) entry, per byte of
# activation dtype (4.3 bytes for bf16: full logits cost 2.1 GB more than 2048-token chunks at 8,192
# positions on the 1B shape).
LOGIT_BYTES_PER_ACTIVATION_BYTE = 2.15
# cuDNN's fused attention backward with a packed row's block mask (an additive bias) makes a
# scores-sized float32 buffer for the block it differentiates (bench/attention_paths.py: 4.94 GB
# at 8 x 2048, 32 heads); a plain causal mask needs none.
MASKED_ATTENTION_BYTES = 4.6
# Unfused attention (CPU, Metal's training path) keeps the probabilities of every block for the
# backward pass, and makes float32 scores for the block it computes.
UNFUSED_SCORE_BYTES = 4
# What a step holds beyond its arrays (compiled graph, buffer cache slack), as a share of the
# weights: 1.5 GB on the 1B shape.
OVERHEAD_PER_WEIGHT = 0.6
# Measured costs in speed: all 16 blocks recomputing cost ~10% (bench/h200.sh memory-sweep), chunked
# cross-entropy one more forward pass of the head: a third of the head's share of the step.
ALL_BLOCKS_RECOMPUTE_COST = 0.10
CE_COST_PER_HEAD_SHARE = 1 / 3
CE_CHUNK_TOKENS = 2048
"""The chunk the plan uses: the size measured on the H200 (docs/PERFORMANCE.md)."""
CAP_SHARE = 0.95
"""The soft cap sits this far under the budget: a capped peak overshot its cap by up to 0.7 GB (5%)."""
NEED_SHARE = 0.95
"""A step's estimate must fit in this share of the cap: the estimate's own error, and a cap that
throttles a step needing all of it costs speed (13 GB cap, 12.5 GB need: 4-13%)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model (logical counts, bytes as held in memory)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    parameters: int  # logical parameters (quantized layers count the weights they stand for)
    weight_bytes: int  # every parameter as held: packed words, scales, LoRA weights
    trainable_bytes: int
    activation_bytes: int = 2  # the compute dtype: 2 for bf16/fp16, 4 for float32
    chunkable_head: bool = True  # chunked cross-entropy applies (a frozen head of a supported family)


@dataclass(frozen=True)
class Workload:
    """One step (one micro-batch of one process) and the device's attention kernel."""

    rows: int
    width: int  # input positions per row (the widest batch the data makes)
    packed: bool = False  # rows of several examples: a block-diagonal attention mask
    fused_attention: bool = True  # the device's attention keeps no scores (CUDA at multiples of 128)
    optimizer_states: int = 2  # arrays per trainable parameter: 2 for Adam, 1 SGD with momentum
    accumulation: bool = False  # gradient accumulation keeps one more set of gradients
    float32_lora_products: bool = False

    @property
    def positions(self) -> int:
        return self.rows * self.width


@dataclass(frozen=True)
class Fixed:
    """Settings the config fixed (None: the plan chooses). Blocks: how many recompute, 0 = none."""

    memory_limit_gb: float | None = None
    ce_chunk_tokens: int | None = None
    recompute_blocks: int | None = None


@dataclass(frozen=True)
class Need:
    """A step's estimated peak, in bytes, by part."""

    weights: float
    optimizer: float  # gradients and optimizer state of the trainable parameters
    overhead: float
    activations: float  # what the blocks hold at the end of the forward pass
    scratch: float  # on top of those, at the worst moment: the logits, attention scratch, or a recomputed block

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.overhead + self.activations + self.scratch


@dataclass(frozen=True)
class MemoryPlan:
    """The settings chosen, what a step is estimated to need with them, and why."""

    memory_limit_gb: float  # 0 = MLX's own default
    ce_chunk_tokens: int  # 0 = full logits
    recompute_blocks: int  # 0 = none
    need: Need
    budget_bytes: float
    fits: bool
    layers: int
    rows: int
    width: int
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the run's log: the settings and the estimate they give, by part."""
        cap = f"memory_limit_gb = {self.memory_limit_gb:g}" if self.memory_limit_gb > 0 else "no memory cap"
        chunk = f"ce_chunk_tokens = {self.ce_chunk_tokens}" if self.ce_chunk_tokens else "full logits"
        blocks = f"{self.recompute_blocks} of {self.layers} blocks recompute" if self.recompute_blocks else "no block recomputes"
        n = self.need
        fit = "" if self.fits else ", more than the budget: nothing here fits it"
        return (f"{cap}, {chunk}, {blocks}; a step of {self.rows} x {self.width} tokens needs about {size(n.total)} "
                f"(weights {size(n.weights)}, activations {size(n.activations)}, logits and scratch {size(n.scratch)}, "
                f"optimizer {size(n.optimizer)}, overhead {size(n.overhead)}){fit}")


def size(count: float) -> str:
    """Bytes for a person: GB with one decimal, MB below a GB."""
    return f"{count / GB:.1f} GB" if count >= GB else f"{count / 1e6:.0f} MB"


def _block_bytes(shape: ModelShape, work: Workload) -> float:
    """Activations one block keeps for the backward pass."""
    per_token = (ACTIVATION_HIDDEN * shape.hidden + ACTIVATION_INTERMEDIATE * shape.intermediate) * shape.activation_bytes
    if work.float32_lora_products and shape.activation_bytes < 4:
        per_token += (FLOAT32_LORA_HIDDEN * shape.hidden + FLOAT32_LORA_INTERMEDIATE * shape.intermediate) * 2
    scores = 0.0 if work.fused_attention else work.rows * shape.heads * work.width**2 * shape.activation_bytes
    return work.positions * per_token + scores


def _attention_transient(shape: ModelShape, work: Workload) -> float:
    """Scores-sized scratch of the one block whose attention is being differentiated."""
    entries = work.rows * shape.heads * work.width**2
    if not work.fused_attention:
        return entries * UNFUSED_SCORE_BYTES
    return entries * MASKED_ATTENTION_BYTES if work.packed else 0.0


def _logit_bytes(shape: ModelShape, work: Workload, ce_chunk_tokens: int) -> float:
    positions = work.positions
    if ce_chunk_tokens > 0 and shape.chunkable_head:
        positions = min(positions, ce_chunk_tokens)
    return positions * shape.vocab * shape.activation_bytes * LOGIT_BYTES_PER_ACTIVATION_BYTE


def step_need(shape: ModelShape, work: Workload, ce_chunk_tokens: int = 0, recompute_blocks: int = 0) -> Need:
    """A step's estimated peak memory with these settings.

    At the end of the forward pass every block that does not recompute holds its activations,
    every block that does holds only its input, and the logits are alive; the backward pass frees
    the logits before any block's attention makes its scratch, and brings back one recomputing
    block's activations at a time. The peak is the worst of those moments.
    """
    k = max(0, min(recompute_blocks, shape.layers))
    block = _block_bytes(shape, work)
    checkpoint_inputs = k * work.positions * shape.hidden * shape.activation_bytes
    held = (shape.layers - k) * block + checkpoint_inputs
    transient = _attention_transient(shape, work)
    scratch = max(_logit_bytes(shape, work, ce_chunk_tokens), transient)
    if k:  # the first recomputing block's backward: its activations again, with its attention scratch
        scratch = max(scratch, block + checkpoint_inputs + transient - held)
    optimizer = shape.trainable_bytes * (1 + work.optimizer_states + (1 if work.accumulation else 0))
    return Need(
        weights=float(shape.weight_bytes),
        optimizer=float(optimizer),
        overhead=shape.weight_bytes * OVERHEAD_PER_WEIGHT,
        activations=float(held),
        scratch=float(scratch),
    )


def _ladder(shape: ModelShape, work: Workload, fixed: Fixed) -> list[tuple[int, int]]:
    """(ce_chunk_tokens, recompute blocks) from the fastest to the leanest, each saving more.

    The free measures go in the order of memory saved per speed lost: recomputing a block saves
    its activations for a tenth of its share of the step; chunking saves the logits but one
    chunk's for a third of the head's share. Both only grow along the ladder.
    """
    layers = shape.layers
    ce_options = [fixed.ce_chunk_tokens] if fixed.ce_chunk_tokens is not None else [0]
    chunk_helps = (
        fixed.ce_chunk_tokens is None
        and shape.chunkable_head
        and step_need(shape, work, CE_CHUNK_TOKENS).total < step_need(shape, work, 0).total
    )
    if chunk_helps:
        ce_options.append(CE_CHUNK_TOKENS)
    blocks = [fixed.recompute_blocks] if fixed.recompute_blocks is not None else list(range(layers + 1))
    if len(ce_options) == 1:
        return [(ce_options[0], k) for k in blocks]
    full = step_need(shape, work, 0)
    one_block = full.total - step_need(shape, work, 0, 1 if layers > 1 else 0).total
    block_cost = ALL_BLOCKS_RECOMPUTE_COST / max(layers, 1)
    ce_saves = full.total - step_need(shape, work, CE_CHUNK_TOKENS).total
    head_share = shape.vocab * shape.hidden / max(shape.parameters, 1)
    ce_cost = CE_COST_PER_HEAD_SHARE * head_share
    if len(blocks) > 1 and one_block / block_cost >= ce_saves / ce_cost:
        return [(0, k) for k in blocks] + [(CE_CHUNK_TOKENS, blocks[-1])]
    return [(0, blocks[0])] + [(CE_CHUNK_TOKENS, k) for k in blocks]


def plan_memory(
    shape: ModelShape, work: Workload, budget_bytes: float, cap_applies: bool, fixed: Fixed | None = None
) -> MemoryPlan:
    """The settings for a budget: the leanest rung of the ladder needed to fit, and a cap under it.

    ``cap_applies``: the device queues work ahead of itself (a GPU), so a soft cap
    (``mx.set_memory_limit``) keeps the peak near the budget; on a CPU the cap stays MLX's default.
    Settings in ``fixed`` are kept as given; the others are chosen around them.
    """
    fixed = fixed or Fixed()
    reasons: list[str] = []
    if fixed.memory_limit_gb is not None:
        cap_gb = fixed.memory_limit_gb
        reasons.append(f"memory_limit_gb = {cap_gb:g} as the config sets it")
    elif cap_applies:
        cap_gb = max(math.floor(budget_bytes * CAP_SHARE / GB * 100) / 100, 0.01)  # 0 would mean no cap
        reasons.append(f"memory_limit_gb = {cap_gb:g}: a soft cap {100 - 100 * CAP_SHARE:.0f}% under the budget, so "
                       "MLX waits for queued work instead of holding its buffers past it")
    else:
        cap_gb = 0.0
        reasons.append("no memory cap: the CPU runs work as it is queued")
    target = budget_bytes * CAP_SHARE * NEED_SHARE if cap_applies else budget_bytes
    if cap_gb > 0:
        target = min(target, cap_gb * GB * NEED_SHARE)
    ladder = _ladder(shape, work, fixed)
    chosen = next((rung for rung in ladder if step_need(shape, work, *rung).total <= target), ladder[-1])
    need = step_need(shape, work, *chosen)
    fits = need.total <= target
    baseline = step_need(shape, work, ladder[0][0], ladder[0][1])
    reasons.append(
        f"{work.rows} rows x {work.width} tokens: a step needs about {baseline.total / GB:.1f} GB as configured "
        f"(weights {baseline.weights / GB:.1f}, optimizer {baseline.optimizer / GB:.1f}, activations "
        f"{baseline.activations / GB:.1f}, logits and scratch {baseline.scratch / GB:.1f}, overhead "
        f"{baseline.overhead / GB:.1f}); the plan keeps it under {target / GB:.1f} GB"
    )
    ce, blocks = chosen
    if fixed.ce_chunk_tokens is not None:
        reasons.append(f"ce_chunk_tokens = {ce} as the config sets it")
    elif ce:
        reasons.append(f"ce_chunk_tokens = {ce}: the logits a chunk at a time")
    if fixed.recompute_blocks is not None:
        reasons.append(f"{blocks} recomputing blocks as the config sets them")
    elif blocks:
        reasons.append(f"{blocks} of {shape.layers} blocks recompute their activations in the backward pass")
    if not fits:
        reasons.append("nothing fits the budget: the leanest settings are used, and MLX may go past the cap")
    return MemoryPlan(cap_gb, ce, blocks, need, budget_bytes, fits, shape.layers, work.rows, work.width, reasons)
