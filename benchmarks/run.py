"""diffcore vs diffusers, side by side: ``make bench`` (or ``python -m benchmarks.run [--quick]``).

For each workload and dtype: one worker process per engine loads the same checkpoint, both run one
warm-up request, then requests alternate A B A B (``--pairs``); the speed-up is the median of the
per-pair ratios diffusers/diffcore, with min-max. Load time is measured in fresh processes (imports
excluded), peak RSS is each worker's VmHWM after loading and all runs. Outputs of the two engines
(same seed) are compared with max|diff| and PSNR. Results: benchmarks/results/latest.json and the
tables in benchmarks/README.md (``--quick`` writes results/quick.json only).

Checkpoints: fp32 runs use the fp32-stored checkpoint the harness builds; bf16 runs (timings, RSS,
outputs, load) use a bf16-stored copy of it (built once next to it, as public FLUX / Qwen-Image / Wan 2.2
checkpoints are stored). For bf16 the load time is also measured on the fp32-stored checkpoint cast
to bf16 at load ("fp32 ckpt cast" in the table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TMP = RESULTS / "tmp"
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.workloads import WORKLOADS, checkpoint  # noqa: E402

ENGINES = ("diffusers", "diffcore")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, engine: str, folder: Path, pipeline: str, dtype: str, threads: int, compile: bool = False,
                 engine_args: dict | None = None):
        cmd = [sys.executable, "-m", "benchmarks.worker", "serve", "--engine", engine, "--folder", str(folder),
               "--pipeline", pipeline, "--dtype", dtype, "--threads", str(threads),
               "--engine-args", json.dumps(engine_args or {})]
        if compile and engine == "diffcore":
            cmd.append("--compile")
        self.engine = engine
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL)
        self._read()  # ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker died (rerun with BENCH_VERBOSE=1 to see its stderr)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.engine} worker: {reply['error']}")
        return reply

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        status = self.call("exit")
        self.proc.wait(timeout=60)
        return status


def worker_reply(mode: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.worker", mode, "--threads", str(threads)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_peak(threads: int) -> dict:
    return worker_reply("matmul", threads)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def compare(a_path: Path, b_path: Path) -> dict:
    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    return {"max_abs_diff": float(np.abs(a - b).max()), "psnr_db": psnr(a, b)}


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def read_files(folder: Path) -> None:
    """Read every file once, so that no engine's load pays for a cold page cache (the first load would)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def load_times(w, folder: Path, dtype: str, args, n: int) -> dict[str, list[float]]:
    """``n`` from_pretrained times per engine, each in a fresh process, engines alternating."""
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for _ in range(n):
        for e in ENGINES:
            wk = Worker(e, folder, w.pipeline, dtype, args.threads)
            times[e].append(wk.call("load")["load_s"])
            wk.close()
    return times


def bench_pair(w, folder: Path, dtype: str, args, params: dict, cast_folder: Path | None = None) -> dict:
    """Both engines on one workload and dtype: load, warm-up, alternating timed runs, RSS, outputs.
    ``folder`` stores the weights in ``dtype``; with ``cast_folder`` (stored in another dtype) the load
    time is also measured casting that checkpoint to ``dtype`` at load (``res["load_cast"]``)."""
    tag = f"{w.name}-{dtype}"
    read_files(folder)
    workers = {e: Worker(e, folder, w.pipeline, dtype, args.threads, args.compile) for e in ENGINES}
    res: dict = {"workload": w.name, "dtype": dtype, "checkpoint_dtype": dtype, "params": params, "engines": {},
                 "compile": args.compile}
    try:
        for e, wk in workers.items():
            res["engines"][e] = {"load_s": [wk.call("load")["load_s"]], "runs": []}
        for e, wk in workers.items():  # warm-up (also the outputs compared below: same seed, deterministic)
            wk.call("run", params=params, out=str(TMP / f"{tag}-{e}.npy"))
        for i in range(args.pairs):
            for e, wk in workers.items():
                r = wk.call("run", params=params)
                res["engines"][e]["runs"].append(r)
            ratio = res["engines"]["diffusers"]["runs"][-1]["total_s"] / res["engines"]["diffcore"]["runs"][-1]["total_s"]
            log(f"{tag} pair {i + 1}/{args.pairs}: diffusers/diffcore = {ratio:.2f}")
        if w.name == "flux":
            res["flops_per_call"] = workers["diffcore"].call("flops", params=params)["flops"]
        if w.name == "flux" and dtype == "fp32" and args.thresholds:
            res["cache_curve"] = cache_curve(workers["diffcore"], params, args, tag)
    finally:
        for e, wk in workers.items():
            try:
                res["engines"][e]["peak_rss_mb"] = wk.close()["vmhwm_mb"]
            except Exception as exc:  # noqa: BLE001
                log(f"{e} worker: {exc}")
                wk.proc.kill()
    for e, times in load_times(w, folder, dtype, args, args.load_pairs - 1).items():
        res["engines"][e]["load_s"] += times
    if cast_folder is not None:
        read_files(cast_folder)
        cast = {e: {"load_s": t, "load": _summary(t)}
                for e, t in load_times(w, cast_folder, dtype, args, args.load_pairs).items()}
        res["load_cast"] = {"checkpoint_dtype": "fp32", "engines": cast,
                            "speedup": cast["diffusers"]["load"]["median"] / cast["diffcore"]["load"]["median"]}
    for e in ENGINES:
        eng = res["engines"][e]
        eng["total_s"] = _summary([r["total_s"] for r in eng["runs"]])
        for stage in ("text_encoding", "denoising", "decoding"):
            eng[stage + "_s"] = statistics.median(r["stages"][stage] for r in eng["runs"])
        eng["denoising_step_s"] = eng["denoising_s"] / params["num_inference_steps"]
        eng["load"] = _summary(eng["load_s"])
    ratios = [a["total_s"] / b["total_s"] for a, b in zip(res["engines"]["diffusers"]["runs"],
                                                           res["engines"]["diffcore"]["runs"])]
    res["speedup"] = _summary(ratios)
    runs = {e: res["engines"][e]["runs"] for e in ENGINES}
    if all("cpu_s" in r for e in ENGINES for r in runs[e]):  # the same pairs in process CPU time
        for e in ENGINES:
            res["engines"][e]["cpu_s"] = _summary([r["cpu_s"] for r in runs[e]])
        res["cpu_speedup"] = _summary([a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["diffusers"], runs["diffcore"])])
    res["load_speedup"] = res["engines"]["diffusers"]["load"]["median"] / res["engines"]["diffcore"]["load"]["median"]
    res["output"] = compare(TMP / f"{tag}-diffusers.npy", TMP / f"{tag}-diffcore.npy")
    return res


def cache_curve(worker: Worker, params: dict, args, tag: str) -> list[dict]:
    """diffcore with each step-cache policy/threshold: time and PSNR against the uncached diffcore output."""
    ref = TMP / f"{tag}-diffcore.npy"
    rows = []
    for policy, threshold in args.thresholds:
        out = TMP / f"{tag}-{policy}-{threshold}.npy"
        cache = {"name": policy, "threshold": threshold}
        runs = [worker.call("run", params=params, cache=cache, out=str(out) if i == 0 else None)
                for i in range(args.cache_runs)]
        row = {"policy": policy, "threshold": threshold, "total_s": _summary([r["total_s"] for r in runs]),
               "stats": runs[0]["stages"].get("cache_stats", {}), **compare(out, ref)}
        log(f"{tag} {policy}@{threshold}: {row['total_s']['median']:.2f}s psnr={row.get('psnr_db', 0):.1f} "
            f"{row['stats']}")
        rows.append(row)
    return rows


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import diffusers
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "gpu": "none lent to this task, not measured"}


def parse_thresholds(text: str) -> list[tuple[str, float]]:
    out = []
    for item in filter(None, text.split(",")):
        policy, _, value = item.partition("@")
        out.append((policy, float(value)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps and pairs; writes results/quick.json")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 runs load the fp32-stored checkpoint, bf16 runs a "
                    "bf16-stored copy of it (built once); bf16 load is also timed casting the fp32 checkpoint")
    ap.add_argument("--pairs", type=int, default=None, help="timed A/B pairs after the warm-up (default 5; quick 2)")
    ap.add_argument("--load-pairs", type=int, default=None, help="load-time measurements per engine and checkpoint, "
                    "each in a fresh process (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's default)")
    ap.add_argument("--thresholds", default="fbcache@0.3,fbcache@0.4,fbcache@0.5,fbcache@0.6,teacache@0.2,teacache@0.4,teacache@0.8",
                    help="FLUX fp32 step-cache curve, policy@threshold,... ('' to skip)")
    ap.add_argument("--cache-runs", type=int, default=None)
    ap.add_argument("--name", default=None, help="results/<name>.json and README section <name> (default: latest; "
                    "quick runs: quick, README untouched)")
    ap.add_argument("--compile", action="store_true", help="run diffcore with EngineArgs(compile=True) (opt-in "
                    "torch.compile; the warm-up absorbs the compilation); load times then include no compilation")
    args = ap.parse_args(argv)
    args.pairs = args.pairs or (2 if args.quick else 5)
    args.load_pairs = args.load_pairs or (1 if args.quick else 3)
    args.cache_runs = args.cache_runs or (1 if args.quick else 3)
    args.thresholds = parse_thresholds(args.thresholds)
    TMP.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.time()
    info = {"machine": machine(), "load_avg_start": os.getloadavg(), "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pairs": args.pairs, "load_pairs": args.load_pairs,
            "quick": args.quick,
            "threads": args.threads or "torch default"}
    log(f"matmul throughput ... (load average {info['load_avg_start']})")
    info["matmul"] = matmul_peak(args.threads)
    info["fastpaths"] = worker_reply("fastpaths", args.threads)  # CPU capability and the fast paths diffcore takes
    log(f"CPU capability {info['fastpaths']['cpu']['capability']}; fast paths off: "
        + (", ".join(f"{p} {d}" for p, v in info["fastpaths"]["paths"].items() for d in ("float32", "bfloat16")
                     if not v[d]["fast"]) or "none"))
    log(f"matmul GFLOP/s: fp32 {info['matmul']['fp32']['gflops_best']:.0f}, bf16 {info['matmul']['bf16']['gflops_best']:.0f}")
    results, errors = [], []
    for name in filter(None, args.workloads.split(",")):
        w = WORKLOADS[name]
        params = {**w.params, **(w.quick_params if args.quick else {}), "seed": 0}
        for dtype in args.dtypes.split(","):
            log(f"{name} {dtype}: {params}")
            try:
                cast_folder = None if dtype == "fp32" else checkpoint(name, log=log)
                res = bench_pair(w, checkpoint(name, dtype, log=log), dtype, args, params, cast_folder)
            except Exception as exc:  # noqa: BLE001 - record it and go on with the other workloads
                log(f"{name} {dtype} FAILED: {exc}")
                errors.append({"workload": name, "dtype": dtype, "error": str(exc)})
                continue
            if "flops_per_call" in res:
                step = res["engines"]["diffcore"]["denoising_step_s"] / w.calls_per_step
                res["achieved_gflops"] = res["flops_per_call"] / step / 1e9
                res["fraction_of_peak"] = {k: res["achieved_gflops"] / info["matmul"][k]["gflops_best"] for k in ("fp32", "bf16")}
            results.append(res)
            log(f"{name} {dtype}: speed-up {res['speedup']['median']:.2f} "
                f"({res['speedup']['min']:.2f}-{res['speedup']['max']:.2f}), load {res['load_speedup']:.2f}x"
                + (f" (fp32 ckpt cast {res['load_cast']['speedup']:.2f}x)" if "load_cast" in res else "")
                + f", output {res['output']}")
    for res in results:  # bf16 vs fp32 of the same engine
        if res["dtype"] == "bf16":
            for e in ENGINES:
                ref = TMP / f"{res['workload']}-fp32-{e}.npy"
                if ref.exists():
                    res.setdefault("bf16_vs_fp32", {})[e] = compare(TMP / f"{res['workload']}-bf16-{e}.npy", ref)
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.time() - started
    doc = {**info, "results": results, "errors": errors}
    name = args.name or ("quick" if args.quick else "latest")
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    table = report.markdown(doc)
    print(table)
    if not args.quick or args.name:
        report.update_readme(HERE / "README.md", table, section=name)
    log(f"wrote {out} ({info['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
