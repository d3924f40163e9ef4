"""Check a PEFT export against Hugging Face PEFT itself: same logits as the MLX model with the adapter.

    python bench/peft_check.py [--iterations 30]

Needs mlx, mlx-lm, torch, transformers and peft (the H200 machine has the last three; this
machine has no PyTorch). Trains the embedded model briefly, exports with `--format peft`, loads
the base model in transformers (LlamaForCausalLM) with PeftModel.from_pretrained, and compares
logits on a few token sequences with mlx-lm's model + adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401  (first: OpenBLAS before mlx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tt-peft-"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TUNETOP_HOME=str(home / "home"), PYTHONPATH=path)
    cli = [sys.executable, "-m", "tunetop.cli"]
    config = home / "run.toml"
    subprocess.run([*cli, "init", str(config)], env=env, check=True, capture_output=True)
    config.write_text(config.read_text().replace("iterations = 300", f"iterations = {args.iterations}"))
    subprocess.run([*cli, "train", str(config)], env=env, check=True, capture_output=True)
    out = home / "peft"
    subprocess.run([*cli, "export", "--format", "peft", "--output", str(out)], env=env, check=True)

    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaForCausalLM

    adapter_config = json.loads((home / "home" / "runs").glob("*/adapters/adapter_config.json").__next__().read_text())
    model_path = Path(adapter_config["model"])
    adapters = next((home / "home" / "runs").glob("*/adapters"))
    # transformers wants PyTorch-flavoured safetensors metadata; the tensors are the same.
    hf_base = home / "hf-base"
    hf_base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_base / name).write_bytes((model_path / name).read_bytes())
    tensors = load_file(str(model_path / "model.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(hf_base / "model.safetensors"), metadata={"format": "pt"})

    tokens = [[5, 17, 42, 99, 7, 3, 250, 11, 300, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    # Compare in plain float32 on the CPU: a GPU may run float32 matmuls in TF32, which alone
    # moves logits by ~1e-2.
    mx.set_default_device(mx.cpu)
    mlx_model, _ = load(str(model_path), adapter_path=str(adapters))
    ours = np.array(mlx_model(mx.array(tokens)).astype(mx.float32))
    base = LlamaForCausalLM.from_pretrained(str(hf_base), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.numpy()
        plain = base.get_base_model()(torch.tensor(tokens)).logits.numpy() if hasattr(base, "get_base_model") else None
    difference = float(np.abs(ours - theirs).max())
    changed = float(np.abs(ours - np.array(load(str(model_path))[0](mx.array(tokens)).astype(mx.float32))).max())
    print(f"max |logits(MLX + adapter) - logits(PEFT)| = {difference:.2e}; the adapter moves logits by up to {changed:.2e}")
    print("PEFT CHECK", "OK" if difference < 1e-3 and changed > 1e-2 else "FAILED")
    del plain


if __name__ == "__main__":
    main()
