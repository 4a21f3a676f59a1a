"""`diffcore serve` under load: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients, batching
on (--max-batch-size 8) vs off (1), on the demo model and FLUX-medium; and (``--mixed``) an open-loop mixed
workload, start-only batching vs step-level joining (``--step-batching off`` / ``on``).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.serve [--models demo,flux] [--clients 1,4,16] [--rounds 2]
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.serve --models flux --clients 1,4 --requests 4 --rounds 1 \
        --out results/tmp/serve-smoke.json  # a smoke run that leaves results/serve.json alone

The real server runs on 127.0.0.1 in this process (uvicorn in a thread); clients are threads posting
/v1/images/generations with distinct seeds. Batching on and off alternate (on, off, on, off, ...) for
``--rounds`` rounds at every client count; each cell reports the median over rounds. Results go to
benchmarks/results/serve.json (or ``--out``, relative to benchmarks/) and a markdown table on stdout
(pasted into benchmarks/README.md).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.serve --mixed [--clients 1,4,16,64] [--per-client 2]

``--mixed``: every client is an open-loop Poisson source (exponential gaps, mean ``--gap`` s) sending
``--per-client`` requests of a random mix of step counts and sizes (``MIX``), whatever the server's answers;
``--step-batching`` off and on alternate per cell (same arrival times and requests), both with
--max-batch-size 8 --batch-wait-ms 20, on the demo model. Each cell reports req/s (completed / time from the
first arrival to the last answer), p50/p99 latency and the transformer calls (and rows) the engine made.
Results: benchmarks/results/serve_mixed.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Per request: what a client asks for. FLUX-medium at 128x128 and 8 steps keeps a run in minutes on 2 cores.
MODELS = {
    "demo": dict(size="128x128", num_inference_steps=20),
    "flux": dict(size="128x128", num_inference_steps=8, guidance_scale=3.5),
}


def load(name: str, threads: int):
    from diffcore import DiffGenerator

    if name == "demo":
        return DiffGenerator.from_pretrained("demo", progress=False, num_threads=threads)
    from benchmarks.workloads import checkpoint

    return DiffGenerator.from_pretrained(checkpoint("flux"), dtype="float32", progress=False, num_threads=threads)


def run_cell(gen, model: str, batching: bool, clients: int, requests: int, seed0: int) -> dict:
    import httpx

    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import running_server

    settings = ServeSettings(max_batch_size=8 if batching else 1, batch_wait_ms=20, max_queue=256)
    body = {"prompt": "a red circle on a blue background", **MODELS[model]}
    with running_server(gen, settings) as (base, app), httpx.Client(timeout=3600) as http:
        batches = []
        app.state.diffcore.runner.on_batch = lambda n: batches.append(n)

        def one(i: int) -> float:
            start = time.perf_counter()
            r = http.post(base + "/v1/images/generations", json={**body, "seed": seed0 + i})
            r.raise_for_status()
            return time.perf_counter() - start

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"req_per_s": requests / wall, "p50_s": statistics.median(latencies), "p99_s": q[98],
            "mean_batch": statistics.mean(batches) if batches else None, "requests": requests}


# The mixed workload (demo model): step counts and sizes drawn per request.
MIX = dict(steps=(4, 8, 16, 32), sizes=(("64x64", 0.8), ("96x96", 0.2)))


def mixed_requests(clients: int, per_client: int, gap: float, seed: int) -> list[tuple[float, dict]]:
    """``(arrival time, body)`` for every request: each client's arrivals are a Poisson process of rate 1/gap."""
    import random

    rng = random.Random(seed)
    out = []
    for c in range(clients):
        t = 0.0
        for k in range(per_client):
            t += rng.expovariate(1 / gap)
            size = rng.choices([s for s, _ in MIX["sizes"]], [w for _, w in MIX["sizes"]])[0]
            out.append((t, {"prompt": f"client {c} picture {k}", "size": size, "seed": rng.randrange(10**6),
                            "num_inference_steps": rng.choice(MIX["steps"])}))
    return sorted(out, key=lambda a: a[0])


def run_mixed_cell(gen, step_batching: bool, arrivals: list) -> dict:
    import threading

    import httpx

    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.joining import count_rows
    from diffcore.testing.serving import running_server

    settings = ServeSettings(max_batch_size=8, batch_wait_ms=20, max_queue=1024, step_batching=step_batching,
                             request_timeout=3600)
    latencies, failed = [], []
    rows, remove = count_rows(gen)
    try:
        with running_server(gen, settings) as (base, app), httpx.Client(timeout=3600, limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=None)) as http:
            def one(body: dict) -> None:
                start = time.perf_counter()
                r = http.post(base + "/v1/images/generations", json=body)
                (latencies if r.status_code == 200 else failed).append(time.perf_counter() - start)

            threads, start = [], time.perf_counter()
            for at, body in arrivals:
                time.sleep(max(0.0, at - (time.perf_counter() - start)))
                threads.append(threading.Thread(target=one, args=(body,)))
                threads[-1].start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
    finally:
        remove()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"req_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies), "p99_s": q[98],
            "calls": len(rows), "rows": sum(rows), "failed": len(failed), "requests": len(arrivals)}


def main_mixed(args) -> int:
    from diffcore import DiffGenerator

    clients = [int(c) for c in args.clients.split(",")]
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_at_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": args.threads, "rounds": args.rounds, "model": "demo", "mix": MIX, "gap_s": args.gap,
            "per_client": args.per_client, "max_batch_size": 8, "batch_wait_ms": 20}
    gen = DiffGenerator.from_pretrained("demo", progress=False, num_threads=args.threads)
    gen.generate(prompt="warm-up", seed=0, height=64, width=64, num_inference_steps=2)
    rows = []
    for n in clients:
        cells: dict = {False: [], True: []}
        for r in range(args.rounds):
            arrivals = mixed_requests(n, args.per_client, args.gap, seed=1000 * r + n)
            for step_batching in (False, True):
                cells[step_batching].append(run_mixed_cell(gen, step_batching, arrivals))
        for step_batching, results in cells.items():
            row = {"clients": n, "step_batching": step_batching, "requests": results[0]["requests"]}
            for key in ("req_per_s", "p50_s", "p99_s", "calls", "rows", "failed"):
                row[key] = statistics.median(c[key] for c in results)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta["load_at_end"] = os.getloadavg()
    out = HERE / (args.out if args.out != "results/serve.json" else "results/serve_mixed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(mixed_table(rows))
    return 0


def mixed_table(rows: list[dict]) -> str:
    out = ["| clients | requests | joining | req/s | p50 (s) | p99 (s) | transformer calls | rows |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['clients']} | {r['requests']} | {'on' if r['step_batching'] else 'off'} | "
                   f"{r['req_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['calls']:.0f} | {r['rows']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,flux")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs per cell (median reported)")
    ap.add_argument("--requests", type=int, default=0, help="requests per cell (default: the client count, at least 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine")
    ap.add_argument("--out", default="results/serve.json", help="the JSON results file, relative to benchmarks/")
    ap.add_argument("--mixed", action="store_true", help="the open-loop mixed workload, joining off vs on")
    ap.add_argument("--per-client", type=int, default=2, help="--mixed: requests each client sends")
    ap.add_argument("--gap", type=float, default=16.0, help="--mixed: mean seconds between a client's requests")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mixed:
        return main_mixed(args)
    clients = [int(c) for c in args.clients.split(",")]
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_at_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": args.threads, "rounds": args.rounds, "models": {m: MODELS[m] for m in args.models.split(",")}}
    rows = []
    for model in args.models.split(","):
        gen = load(model, args.threads)
        runner = gen.make_runner(max_queue=1)
        meta.setdefault("runner", type(runner).__name__)
        runner.shutdown()
        gen.generate(prompt="warm-up", seed=0, **_params(MODELS[model]))  # first call pays one-time layouts
        for n in clients:
            requests = args.requests or max(4, n)
            cells = {True: [], False: []}
            for r in range(args.rounds):
                for batching in (True, False):
                    cells[batching].append(run_cell(gen, model, batching, n, requests, seed0=1000 * r))
            for batching, results in cells.items():
                row = {"model": model, "clients": n, "batching": batching, "requests": requests}
                for key in ("req_per_s", "p50_s", "p99_s", "mean_batch"):
                    values = [c[key] for c in results if c[key] is not None]
                    row[key] = statistics.median(values) if values else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta["load_at_end"] = os.getloadavg()
    out = HERE / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(table(meta, rows))
    return 0


def _params(request: dict) -> dict:
    w, h = (int(v) for v in request["size"].split("x"))
    return {"height": h, "width": w, **{k: v for k, v in request.items() if k != "size"}}


def table(meta: dict, rows: list[dict]) -> str:
    out = ["| model | clients | batching | req/s | p50 (s) | p99 (s) | mean batch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        out.append(f"| {r['model']} | {r['clients']} | {'on' if r['batching'] else 'off'} | {r['req_per_s']:.2f} | "
                   f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {mb} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
