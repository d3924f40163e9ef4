"""PyTorch + PEFT LoRA training speed on fixed-length rows: the other side of an equal-work comparison.

    python bench/peft_throughput.py --model /tmp/bench1b/model --data /tmp/bench1b/fixed512 \\
        [--batch-size 8] [--iters 60] [--report 10] [--rank 8] [--num-layers 16] [--peak-tflops P]

Needs torch (CUDA), transformers and peft: the H200 machine has them; this project does not depend
on them. It loads the same model folder bench/make_bench_model.py writes (safetensors, bf16) with
transformers, wraps every linear layer of the last N blocks in LoRA (rank r, alpha = 20 r: the
scale 20 tunetop and mlx-lm use), and trains on the folder's train.jsonl rows, each padded to
512 tokens, batch B, AdamW, bf16 autocast (the adapters stay float32, as PEFT makes them), PyTorch's
SDPA attention, no gradient checkpointing. So a step does the same work as tunetop's or
mlx_lm.lora's on the same rows and batch (``--packing off`` for tunetop: one example a row).

Prints a RESULT line (JSON) like bench/throughput.py's: steady tokens/s (real tokens, every report
but the first, which includes CUDA's warm-up), peak memory (torch.cuda.max_memory_allocated, and
what the caching allocator reserved), and MFU at 4 x parameters a token against ``--peak-tflops``
(the bf16 matmul rate bench/throughput.py --measure-peak measured on the same GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--report", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--row-tokens", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device)
    layers = model.config.num_hidden_layers
    first = max(0, layers - args.num_layers)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=args.rank, lora_alpha=20 * args.rank, lora_dropout=0.0, target_modules=names,
                      layers_to_transform=list(range(first, layers)), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    rows = [json.loads(line)["text"] for line in (Path(args.data) / "train.jsonl").read_text().splitlines() if line.strip()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer.encode(text)[: args.row_tokens] for text in rows]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        chosen = [encoded[(step * args.batch_size + i) % len(encoded)] for i in range(args.batch_size)]
        ids = torch.full((args.batch_size, args.row_tokens), pad, dtype=torch.long)
        labels = torch.full((args.batch_size, args.row_tokens), -100, dtype=torch.long)
        for i, row in enumerate(chosen):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(row)
        real = sum(max(0, len(row) - 1) for row in chosen)  # positions with a target, as the others count
        return ids.to(device), labels.to(device), real

    torch.cuda.reset_peak_memory_stats()
    reports: list[float] = []
    tokens = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    wall = start
    for step in range(args.iters):
        ids, labels, real = batch(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
        if (step + 1) % args.report == 0:
            torch.cuda.synchronize()
            now = time.perf_counter()
            reports.append(tokens / (now - start))
            print(f"step {step + 1}: loss {loss.item():.3f}, {reports[-1]:,.0f} tok/s", flush=True)
            tokens, start = 0, now
    steady = statistics.fmean(reports[1:] or reports)
    result = {
        "trainer": "torch+peft",
        "steady_tokens_per_second": round(steady),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "torch": torch.__version__,
    }
    if args.peak_tflops:
        result["mfu"] = round(steady * 4 * total / (args.peak_tflops * 1e12), 4)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
