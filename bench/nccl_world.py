"""A one-rank NCCL world through tunetop's distributed path, for a machine with one GPU.

    python bench/nccl_world.py [--iterations 30]

Runs the engine as rank 0 of a world of one over mx.distributed's NCCL backend (the code path
of `tunetop train --hosts ... --backend nccl` and of `--np N --backend nccl` on an N-GPU machine),
on the embedded model, and prints what the journal says. What it shows: MLX's NCCL backend
initializes on this GPU, rank 0's control channel and the run's world event work, and the run
completes. What it cannot show: collectives between ranks (a world of one skips them; that
needs two GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tunetop  # noqa: E402,F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tt-nccl-"))
    os.environ.setdefault("TUNETOP_HOME", str(home))
    os.environ.setdefault("TUNETOP_SOCKET_DIR", tempfile.mkdtemp(prefix="tt-", dir="/tmp"))

    from tunetop.runs.distributed import free_port as port

    os.environ.update(MLX_RANK="0", MLX_WORLD_SIZE="1", NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(port()),
                      TUNETOP_DIST_CONTROL=f"tcp://127.0.0.1:{port()}")
    from tunetop.cli import main as cli
    from tunetop.control.journal import read_events
    from tunetop.runs.folders import create_run
    from tunetop.training import config as config_module

    cfg = config_module.parse(config_module.starter_text())
    cfg.training.iterations = args.iterations
    cfg.training.steps_per_report = 10
    run = create_run()
    config_module.save(cfg, run.config)
    code = cli(["_engine", str(run.path), "--launched", "--backend", "nccl"])
    events = list(read_events(run.journal))
    for event in events:
        if event["type"] in ("world", "train", "error", "finished", "rank_failed"):
            print({k: v for k, v in event.items() if k not in ("run", "ts")})
    print(f"exit code {code}")


if __name__ == "__main__":
    main()
