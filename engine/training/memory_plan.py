"""How a run fits a memory budget: the memory cap, micro-batches, chunked cross-entropy and
recomputing blocks.

A pure function of numbers (no mlx, no I/O): the model's shape, the rows of a step, the budget
in bytes and which settings the config fixed. :func:`plan_memory` estimates what a step needs
(:func:`step_need`) and what each combination of settings costs in speed (:func:`step_cost`),
keeps the combinations that save memory over every faster one (a ladder from the fastest step
to the leanest), and takes the first whose estimate fits. A tighter budget therefore never gets
a step estimated faster or needing more. ``engine/training/memory_budget.py`` reads the device
and the model into these inputs.

The figures are the H200's of docs/PERFORMANCE.md (Llama-3.2-1B's shape in bf16, and
Llama-3.1-8B's quantized to 4 bits; packed rows of 2048; ``bench/memory_plan_table.py``).
Splitting a step's rows into micro-batches (the same update, gradients summed within the step)
is the cheapest saving per GB there: 8 rows in one pass ran at 60.5k tok/s, 4 rows at 55.4k,
while 14 of 16 blocks recomputing at 8 rows ran at 47.0k in the memory 4 rows need.
"""

from __future__ import annotations

import dataclasses
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
# What the parts above miss: allocator rounding and buffers no array accounts for. Fitted so that
# every H200 peak above its cap is at or under the estimate: 4 rows of 2048 with 4,096-token chunks
# and 2 blocks recomputing peaked at 20.0 GB against 18.8 estimated; one setting measured 20.03 and
# 20.55 GB in two sessions.
NEED_MARGIN = 0.07
# Measured costs in speed, as a share of a step's time, under the plan's own cap (the regime it
# runs in). Every block recomputing: 1B bf16 ~33% (8 rows under a 19 GB cap: 10 of 16 blocks 50.9k
# tok/s, 14 of 16 47.0k, against 60.5k with none and no cap; without a cap 4 rows lost 17-20%);
# 8B 4-bit ~67% (2 rows: 28 of 32 blocks 4,187 tok/s, 18 of 32 4,825): a quantized block's forward
# dequantizes every weight again. Chunked cross-entropy: one more forward pass of the head, a third
# of its share of the step (7% on the 1B shape; measured 5-7%).
ALL_BLOCKS_RECOMPUTE_COST = 0.33
ALL_BLOCKS_RECOMPUTE_COST_QUANTIZED = 0.67
CE_COST_PER_HEAD_SHARE = 1 / 3
# A pass over the blocks costs a fixed time beside its tokens' work (launches, the host waiting for
# the device between micro-batches), in parameter x tokens per block: fitted on the 1B shape, where
# 8 rows of 2048 in one pass ran at 60.5k tok/s and 4 rows at 55.4k (a pass is worth ~1,660 tokens).
PASS_OVERHEAD_PER_BLOCK = 1.28e11
CE_CHUNK_TOKENS = 2048
"""The chunk the plan uses: the size measured on the H200 (docs/PERFORMANCE.md)."""
CAP_SHARE = 0.95
"""The soft cap sits this far under the budget."""
NEED_SHARE = 0.95
"""A step's estimate must fit in this share of the cap: a cap that throttles a step needing all of
it costs speed (13 GB cap, 12.5 GB need: 4-13%)."""
CAP_OVERSHOOT = 0.04
"""A capped step's peak: MLX queues work until its buffers reach the cap, whatever the step needs,
then past it by up to this share (H200: 15.52, 15.49 and 15.46 GB at a 15 GB cap for steps estimated
at 11.8 to 15.5; 15.74 at 15.2; 19.26 at 19; 22.91 at 22.8)."""


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

    @property
    def quantized(self) -> bool:
        """Weights held in fewer bytes than the compute dtype (4 or 8 bits): recomputing costs more."""
        return self.weight_bytes < 0.75 * self.parameters * self.activation_bytes


@dataclass(frozen=True)
class Workload:
    """One step of one process (its rows before any split into micro-batches) and the device's attention kernel."""

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
    micro_batches: int | None = None


@dataclass(frozen=True)
class Settings:
    """One rung of the ladder: passes a step's rows take, the cross-entropy chunk (0: full logits)
    and how many blocks recompute."""

    micro_batches: int = 1
    ce_chunk_tokens: int = 0
    recompute_blocks: int = 0


@dataclass(frozen=True)
class Need:
    """A step's estimated peak, in bytes, by part."""

    weights: float
    optimizer: float  # gradients (and their sum over micro-batches) and optimizer state of the trainable parameters
    overhead: float
    activations: float  # what the blocks hold at the end of the forward pass
    scratch: float  # on top of those, at the worst moment: the logits, attention scratch, or a recomputed block
    margin: float = 0.0  # what the parts miss (NEED_MARGIN)

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.overhead + self.activations + self.scratch + self.margin


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
    micro_batches: int = 1  # passes a step's rows take (gradients summed within the step)
    cost: float = 1.0  # the step's estimated time against the fastest settings' (step_cost)

    @property
    def peak(self) -> float:
        """The peak the run should see: the need, or under a cap what MLX queues up to it and a little past."""
        if self.memory_limit_gb <= 0:
            return self.need.total
        return max(self.need.total, self.memory_limit_gb * GB * (1 + CAP_OVERSHOOT))

    def describe(self) -> str:
        """One line for the run's log: the settings and the estimate they give, by part."""
        cap = f"memory_limit_gb = {self.memory_limit_gb:g}" if self.memory_limit_gb > 0 else "no memory cap"
        passes = describe_passes(self.rows, self.micro_batches)
        chunk = f"ce_chunk_tokens = {self.ce_chunk_tokens}" if self.ce_chunk_tokens else "full logits"
        blocks = f"{self.recompute_blocks} of {self.layers} blocks recompute" if self.recompute_blocks else "no block recomputes"
        n = self.need
        fit = "" if self.fits else ", more than the budget: nothing here fits it"
        peak = f", a peak of about {size(self.peak)} under the cap" if self.memory_limit_gb > 0 else ""
        return (f"{cap}, {passes}, {chunk}, {blocks}; a step of {self.rows} x {self.width} tokens needs about {size(n.total)} "
                f"(weights {size(n.weights)}, activations {size(n.activations)}, logits and scratch {size(n.scratch)}, "
                f"optimizer {size(n.optimizer)}, overhead {size(n.overhead + n.margin)}){peak}{fit}")


def describe_passes(rows: int, micro_batches: int) -> str:
    """"one pass of 8 rows", "2 micro-batches of 4 rows" (the last one smaller when they do not divide)."""
    if micro_batches <= 1:
        return f"one pass of {rows} row{'s' if rows != 1 else ''}"
    each = -(-rows // micro_batches)
    return f"{micro_batches} micro-batches of {'up to ' if rows % micro_batches else ''}{each} row{'s' if each != 1 else ''}"


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


def micro_rows(rows: int, micro_batches: int) -> int:
    """Rows of the largest micro-batch when a step's ``rows`` take ``micro_batches`` passes."""
    return -(-rows // max(1, min(micro_batches, rows)))


def step_need(
    shape: ModelShape, work: Workload, ce_chunk_tokens: int = 0, recompute_blocks: int = 0, micro_batches: int = 1
) -> Need:
    """A step's estimated peak memory with these settings.

    At the end of the forward pass every block that does not recompute holds its activations,
    every block that does holds only its input, and the logits are alive; the backward pass frees
    the logits before any block's attention makes its scratch, and brings back one recomputing
    block's activations at a time. The peak is the worst of those moments, in the largest
    micro-batch: micro-batches run one after another, and only their gradients' sum stays.
    """
    split = micro_batches > 1 and work.rows > 1
    work = dataclasses.replace(work, rows=micro_rows(work.rows, micro_batches))
    k = max(0, min(recompute_blocks, shape.layers))
    block = _block_bytes(shape, work)
    checkpoint_inputs = k * work.positions * shape.hidden * shape.activation_bytes
    held = (shape.layers - k) * block + checkpoint_inputs
    transient = _attention_transient(shape, work)
    scratch = max(_logit_bytes(shape, work, ce_chunk_tokens), transient)
    if k:  # the first recomputing block's backward: its activations again, with its attention scratch
        scratch = max(scratch, block + checkpoint_inputs + transient - held)
    gradient_sets = 1 + (1 if work.accumulation else 0) + (1 if split else 0)
    optimizer = shape.trainable_bytes * (gradient_sets + work.optimizer_states)
    parts = (float(shape.weight_bytes), float(optimizer), shape.weight_bytes * OVERHEAD_PER_WEIGHT, float(held), float(scratch))
    return Need(*parts, margin=sum(parts) * NEED_MARGIN)


def step_cost(
    shape: ModelShape, work: Workload, ce_chunk_tokens: int = 0, recompute_blocks: int = 0, micro_batches: int = 1
) -> float:
    """A step's estimated time with these settings, against one pass with nothing given up (1.0).

    Each pass pays a fixed overhead (PASS_OVERHEAD_PER_BLOCK); each recomputing block one more
    forward pass of itself; chunked cross-entropy one more forward pass of the head.
    """
    layers = max(shape.layers, 1)
    per_pass = PASS_OVERHEAD_PER_BLOCK * layers / max(shape.parameters, 1)  # in tokens of work
    recompute = ALL_BLOCKS_RECOMPUTE_COST_QUANTIZED if shape.quantized else ALL_BLOCKS_RECOMPUTE_COST
    work_share = 1 + recompute * max(0, min(recompute_blocks, layers)) / layers
    if ce_chunk_tokens > 0 and shape.chunkable_head:
        work_share += CE_COST_PER_HEAD_SHARE * shape.vocab * shape.hidden / max(shape.parameters, 1)
    passes = max(1, min(micro_batches, work.rows))
    tokens = work.positions
    return (passes * per_pass + tokens * work_share) / (per_pass + tokens)


def _ladder(shape: ModelShape, work: Workload, fixed: Fixed) -> list[Settings]:
    """Settings from the fastest to the leanest, each needing less memory than every faster one.

    Every combination the config leaves open (micro-batches that divide the rows, full or chunked
    logits, 0 to all blocks recomputing) is ranked by :func:`step_cost`; one that saves nothing
    over a faster one is dropped. So the ladder takes each measure in the order of what it saves
    per unit of speed it costs, whatever the shape: on the H200's 1B and 8B shapes micro-batches
    come first, then recomputing blocks, chunking last.
    """
    rows = max(work.rows, 1)
    if fixed.micro_batches is not None:
        splits = [max(1, min(fixed.micro_batches, rows))]
    else:  # divisors only: every pass has the same shape, so the compiled step is traced once
        splits = [m for m in range(1, rows + 1) if rows % m == 0]
    if fixed.ce_chunk_tokens is not None:
        chunks = [fixed.ce_chunk_tokens]
    else:
        chunks = [0, CE_CHUNK_TOKENS] if shape.chunkable_head else [0]
    blocks = [fixed.recompute_blocks] if fixed.recompute_blocks is not None else list(range(shape.layers + 1))
    ranked = sorted(
        (step_cost(shape, work, ce, k, m), step_need(shape, work, ce, k, m).total, m, ce, k)
        for m in splits for ce in chunks for k in blocks
    )
    ladder: list[Settings] = []
    least = math.inf
    for _cost, need, m, ce, k in ranked:
        if need < least * (1 - 1e-9):
            ladder.append(Settings(m, ce, k))
            least = need
    return ladder


def plan_memory(
    shape: ModelShape, work: Workload, budget_bytes: float, cap_applies: bool, fixed: Fixed | None = None
) -> MemoryPlan:
    """The settings for a budget: the fastest rung of the ladder that fits, and a cap under it.

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
    chosen = next((rung for rung in ladder if _need(shape, work, rung).total <= target), ladder[-1])
    need = _need(shape, work, chosen)
    fits = need.total <= target
    baseline = _need(shape, work, ladder[0])
    reasons.append(
        f"{work.rows} rows x {work.width} tokens: a step needs about {baseline.total / GB:.1f} GB as configured "
        f"(weights {baseline.weights / GB:.1f}, optimizer {baseline.optimizer / GB:.1f}, activations "
        f"{baseline.activations / GB:.1f}, logits and scratch {baseline.scratch / GB:.1f}, overhead "
        f"{(baseline.overhead + baseline.margin) / GB:.1f}); the plan keeps it under {target / GB:.1f} GB"
    )
    m, ce, blocks = chosen.micro_batches, chosen.ce_chunk_tokens, chosen.recompute_blocks
    if fixed.micro_batches is not None:
        reasons.append(f"micro_batches = {m} as the config sets it")
    elif m > 1:
        reasons.append(f"{describe_passes(work.rows, m)}: the same update, gradients summed over the step")
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
    return MemoryPlan(cap_gb, ce, blocks, need, budget_bytes, fits, shape.layers, work.rows, work.width, reasons,
                      micro_batches=m, cost=step_cost(shape, work, ce, blocks, m))


def _need(shape: ModelShape, work: Workload, rung: Settings) -> Need:
    return step_need(shape, work, rung.ce_chunk_tokens, rung.recompute_blocks, rung.micro_batches)
