"""Serving throughput: images per second with 1, 4 and 8 concurrent requests, batched vs one at a time.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.serving [--models demo,flux] [--concurrency 1,4,8]

For each model and concurrency c, c requests (different prompts and seeds) are submitted at once
from c threads to a ``BatchScheduler``: with ``max_batch_size=1`` ("one at a time": the scheduler
runs them one after the other) and with ``max_batch_size=c`` ("batched": one batch of c rows through
every text-encoder, transformer and VAE call). The two modes alternate (A B A B ...) for ``--rounds``
rounds; images/s is c / wall time of the round, the table shows the median. The machine, thread
count and load average are recorded with the results (``benchmarks/results/serving.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background",
           "a blue circle on a red background", "a yellow square on a green background",
           "a white circle on a black background", "a black square on a white background",
           "a red square on a green background", "a blue square on a yellow background"]


def _generator(name: str):
    from diffcore import DiffGenerator

    if name == "demo":
        return DiffGenerator.from_pretrained("demo", progress=False), {}  # the bundled model, its defaults
    from benchmarks.workloads import checkpoint

    params = dict(height=128, width=128, num_inference_steps=8, guidance_scale=3.5, max_sequence_length=64)
    return DiffGenerator.from_pretrained(checkpoint("flux"), dtype="float32", progress=False), params


def _round(gen, params: dict, c: int, batched: bool) -> float:
    """Wall time for c requests submitted together (threads released at once)."""
    from diffcore import BatchScheduler

    scheduler = BatchScheduler(gen, max_batch_size=c if batched else 1, max_wait_ms=50, max_queue=64)
    barrier, futures = threading.Barrier(c + 1), [None] * c

    def submit(i):
        barrier.wait()
        futures[i] = scheduler.submit(gen.request({**params, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i,
                                                   "output_type": "np"}))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    for f in futures:
        f.result()
    elapsed = time.perf_counter() - start
    scheduler.shutdown()
    return elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,flux")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    ap.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.run import machine

    info = {"machine": machine(), "torch_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
            "command": " ".join(["python -m benchmarks.serving", *(argv if argv is not None else sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for name in args.models.split(","):
        gen, params = _generator(name)
        _round(gen, params, 2, True)  # warm-up: first-use weight re-layouts, allocator
        for c in map(int, args.concurrency.split(",")):
            times = {"one at a time": [], "batched": []}
            for _ in range(args.rounds):
                for mode in times:  # A B A B ...
                    times[mode].append(_round(gen, params, c, mode == "batched"))
            row = {"model": name, "concurrency": c, "params": params,
                   **{f"{m} s": [round(t, 3) for t in ts] for m, ts in times.items()},
                   **{f"{m} img/s": round(c / statistics.median(ts), 3) for m, ts in times.items()}}
            row["speed-up"] = round(row["batched img/s"] / row["one at a time img/s"], 2)
            info["rows"].append(row)
            print(json.dumps(row), flush=True)
    info["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(table(info))


def table(info: dict) -> str:
    m = info["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {info['torch_threads']} torch thread(s); "
             f"started {info['started']}, load average {info['load_avg_start'][0]:.1f} at start, "
             f"{info['load_avg_end'][0]:.1f} at end. Command: `{info['command']}`.", "",
             "| model | concurrent requests | one at a time (img/s) | batched (img/s) | batched / one at a time |",
             "| --- | --- | --- | --- | --- |"]
    for r in info["rows"]:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['one at a time img/s']:.2f} | {r['batched img/s']:.2f} "
                     f"| {r['speed-up']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
