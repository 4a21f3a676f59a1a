"""Real-time video over WebSocket /v1/realtime/video vs generate() in the same process (diffcore only).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.realtime [--runs 1] [--size 256x256] [--frames 33]

The Wan-medium checkpoint declared ``WanCausalDMDPipeline`` (benchmarks.fewstep's variant: self-forcing's 4
warped steps per block of 3 latent frames), random weights (this measures cost, not quality). Three ways, one
warm server: ``generate()`` with a block_callback (the floor: when the engine hands out each block), then a
real WebSocket client on 127.0.0.1 with ``rgb24`` and with ``fmp4``. For each: the time to the first block
(received by the client, data included), to ``done``, the bytes sent per block, and how long each block took
from the engine's handover to the client (``watch_blocks``). Medians of ``--runs``;
the ways alternate. Writes ``benchmarks/results/realtime.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "realtime.json"
PROMPT = "a red fox running through snow"


def via_generate(gen, kwargs: dict) -> dict:
    start, blocks = time.perf_counter(), []
    gen.generate(prompt=PROMPT, output_type="np", **kwargs,
                 block_callback=lambda b, latents, frames: blocks.append(time.perf_counter() - start))
    return {"first_block_s": blocks[0], "total_s": time.perf_counter() - start, "blocks": len(blocks), "bytes": None}


CALLBACKS: list = []  # when the engine handed each block to the server (its block_callback), this process's clock


def watch_blocks() -> None:
    """Record the engine's block handover in the server (same process): the delivery latency is the client's
    receive time minus it, the WebSocket path's own cost (pixels to uint8, the event-loop hop, fMP4 encoding,
    the send), which the machine's load inflates far less than the generation itself."""
    from diffcore.serve import realtime

    real = realtime.Generation.on_block

    def on_block(self, *args):
        CALLBACKS.append(time.perf_counter())
        return real(self, *args)

    realtime.Generation.on_block = on_block


def via_socket(url: str, kwargs: dict, fmt: str) -> dict:
    from websockets.sync.client import connect

    height, width = kwargs["height"], kwargs["width"]
    start_msg = {"type": "start", "prompt": PROMPT, "size": f"{width}x{height}", "num_frames": kwargs["num_frames"],
                 "seed": kwargs["seed"], "format": fmt}
    times, sizes, received = [], [], []
    CALLBACKS.clear()
    with connect(url, open_timeout=60, max_size=None) as ws:
        start = time.perf_counter()
        ws.send(json.dumps(start_msg))
        while True:
            message = json.loads(ws.recv(timeout=3600))
            if message["type"] == "block":
                sizes.append(len(ws.recv(timeout=3600)))
                received.append(time.perf_counter())
                times.append(received[-1] - start)
            elif message["type"] == "done":
                break
            elif message["type"] == "error":
                raise RuntimeError(message["error"])
    delivery = [r - c for r, c in zip(received, CALLBACKS)]
    return {"first_block_s": times[0], "total_s": time.perf_counter() - start, "blocks": len(times), "bytes": sizes,
            "delivery_ms": [1000 * d for d in delivery]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent.parent))
    import torch

    from benchmarks.fewstep import variant
    from benchmarks.workloads import checkpoint
    from diffcore import DiffGenerator
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import running_server

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    kwargs = dict(height=height, width=width, num_frames=args.frames, seed=0)
    folder = variant(checkpoint("wan"), "causal")
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, allow_external_links=True)
    gen.generate(prompt="warm up", height=64, width=64, num_frames=9, output_type="np")
    watch_blocks()
    ways = ("generate", "rgb24", "fmp4")
    rows = {w: [] for w in ways}
    load0 = os.getloadavg()
    with running_server(gen, ServeSettings(request_timeout=3600)) as (base, _):
        url = base.replace("http://", "ws://") + "/v1/realtime/video"
        for run in range(args.runs):
            for way in ways:
                row = via_generate(gen, kwargs) if way == "generate" else via_socket(url, kwargs, way)
                rows[way].append(row)
                print(f"run {run + 1} {way}: first block {row['first_block_s']:.2f} s, done {row['total_s']:.2f} s",
                      flush=True)
    med = {w: {k: statistics.median(r[k] for r in rows[w]) for k in ("first_block_s", "total_s")} for w in ways}
    for w in ("rgb24", "fmp4"):
        med[w]["bytes_per_block"] = rows[w][-1]["bytes"]
        med[w]["delivery_ms"] = statistics.median(d for r in rows[w] for d in r["delivery_ms"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "loadavg_start": load0, "loadavg_end": os.getloadavg(), "runs": args.runs,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "params": {"prompt": PROMPT, **kwargs}, "summary": med, "runs": rows}, indent=2))
    print(table(med))


def table(med: dict) -> str:
    g = med["generate"]
    lines = ["| way | first block s | done s | first block / done | engine -> client per block, ms (median) | "
             "bytes per block |", "|---|---|---|---|---|---|"]
    for way, label in (("generate", "generate() + block_callback (in process)"),
                       ("rgb24", "WebSocket, rgb24"), ("fmp4", "WebSocket, fmp4 (H.264)")):
        m = med[way]
        sizes = ", ".join(str(b) for b in m.get("bytes_per_block") or []) or "-"
        delivery = f"{m['delivery_ms']:.1f}" if "delivery_ms" in m else "-"
        lines.append(f"| {label} | {m['first_block_s']:.2f} | {m['total_s']:.2f} | "
                     f"{100 * m['first_block_s'] / m['total_s']:.0f}% | {delivery} | {sizes} |")
    lines.append("")
    lines.append(f"WebSocket overhead on the first block: rgb24 {med['rgb24']['first_block_s'] - g['first_block_s']:+.2f} s, "
                 f"fmp4 {med['fmp4']['first_block_s'] - g['first_block_s']:+.2f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
