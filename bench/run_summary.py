"""A finished run's speed and memory, from its events: ``tunetop events RUN | python bench/run_summary.py NAME [PEAK_TFLOPS]``.

Prints the run's memory plan (its "memory budget" log line), then a RESULT line (JSON) as
bench/throughput.py does: steady tokens/s (every report but the first, which includes
compiling), the peak memory over the run, the trainable and total parameters, and with the bf16
matmul rate measured on the same machine (bench/throughput.py --measure-peak) the MFU, counted as
bench/throughput.py does: 4 x total parameters a token (forward and the backward through the
activations; the frozen weights get no gradient).
"""

from __future__ import annotations

import json
import statistics
import sys


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "run"
    peak_tflops = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    events = [json.loads(line) for line in sys.stdin if line.strip()]
    for event in events:
        if event["type"] == "log" and event["message"].startswith("memory budget"):
            print(f"{name}: {event['message']}")
    reports = [e for e in events if e["type"] == "train"]
    started = next((e for e in events if e["type"] == "run_started"), {})
    steady = [e["tokens_per_second"] for e in reports[1:]] or [e["tokens_per_second"] for e in reports]
    result = {
        "run": name,
        "steady_tokens_per_second": round(statistics.fmean(steady)) if steady else 0,
        "peak_gb": round(max((e["peak_memory"] for e in reports), default=0.0), 3),
        "iterations": reports[-1]["iteration"] if reports else 0,
        "trainable_parameters": started.get("trainable_parameters"),
        "total_parameters": started.get("total_parameters"),
        "finished": next((e["reason"] for e in events if e["type"] == "finished"), "no"),
    }
    if peak_tflops and result["total_parameters"]:
        flops = result["steady_tokens_per_second"] * 4 * result["total_parameters"]
        result["mfu"] = round(flops / (peak_tflops * 1e12), 4)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
