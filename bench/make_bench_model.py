"""Make a benchmark model (random weights, a real mlx-lm architecture) and datasets, offline.

    python bench/make_bench_model.py OUT [--shape llama-1b|llama-8b|mid|tiny] [--dtype bfloat16] [--quantize BITS]

OUT/model      config.json, model.safetensors (random), the embedded tokenizer's files
OUT/variable   train/valid.jsonl: text rows with log-normal lengths (median ~220 words)
OUT/fixed512   train/valid.jsonl: text rows of exactly 512 tokens

``llama-1b`` is Llama-3.2-1B's shape: hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 KV
heads, vocab 128256; ``llama-8b`` Llama-3.1-8B's (hidden 4096, 32 layers, intermediate 14336, untied
head). ``--quantize 4`` writes the model as mlx-lm's conversion does (``mlx_lm.convert``, group size
64): the random bf16 weights first, then their quantized copy in OUT/model. The tokenizer is tunetop's embedded one (its ids fit in any vocab), so
no download is needed; throughput does not depend on which tokens they are.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402,F401  (first: OpenBLAS before mlx)

SHAPES = {
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # The 1B model's vocabulary on a body small enough for a CPU: memory comparisons here.
    "mid": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "intermediate_size": 2048,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "rope_theta": 10000.0,
    },
}

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "an", "were", "are", "which", "this", "be", "or", "had", "not", "but", "their", "has", "have", "it", "its", "one", "two", "new", "first", "also", "after", "time", "year", "city", "model", "data", "train", "loss", "river", "market", "school", "music", "field", "power", "light", "water", "stone", "road", "north", "south", "east", "west", "early", "late"]


def make_model(folder: Path, shape: str, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import llama

    from engine.demo import embedded_model_path

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        **SHAPES[shape],
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    def init(w: mx.array) -> mx.array:
        # Matrices as a trained model's (std 0.02); norm weights stay at 1.
        scaled = w * (0.02 / max(float(mx.std(w).item()), 1e-6)) if w.ndim >= 2 else w
        return scaled.astype(getattr(mx, dtype))

    weights = tree_map(init, model.parameters())
    flat = dict(tree_flatten(weights))
    mx.save_safetensors(str(folder / "model.safetensors"), flat, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(embedded_model_path() / name, folder / name)


def make_variable(folder: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", rows), ("valid", max(rows // 20, 16))):
        with (folder / f"{split}.jsonl").open("w") as handle:
            for _ in range(count):
                words = max(5, min(int(rng.lognormvariate(5.4, 0.6)), 1400))  # median e^5.4 ~ 220 words
                handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def make_fixed(folder: Path, rows: int, tokens: int, seed: int) -> None:
    from mlx_lm.utils import load_tokenizer

    from engine.demo import embedded_model_path

    tokenizer = load_tokenizer(embedded_model_path())
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", rows), ("valid", max(rows // 20, 16))):
        with (folder / f"{split}.jsonl").open("w") as handle:
            for _ in range(count):
                ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(tokens)))[: tokens - 1]
                handle.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--quantize", type=int, default=0, metavar="BITS", help="quantize with mlx_lm.convert (4 or 8)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.quantize:
        from mlx_lm import convert

        make_model(out / "model-full", args.shape, args.dtype)
        shutil.rmtree(out / "model", ignore_errors=True)  # convert refuses an existing folder
        convert(str(out / "model-full"), mlx_path=str(out / "model"), quantize=True, q_bits=args.quantize, q_group_size=64)
        shutil.rmtree(out / "model-full")
    else:
        make_model(out / "model", args.shape, args.dtype)
    make_variable(out / "variable", args.rows, seed=1)
    make_fixed(out / "fixed512", args.rows, 512, seed=2)
    print(f"wrote {out}/model, {out}/variable, {out}/fixed512")


if __name__ == "__main__":
    main()
