"""Sequence / CFG parallel timings: 1 process vs sp_degree 2 vs cfg_parallel vs both, FLUX-medium and Wan-medium.

    .venv/bin/python -m benchmarks.parallel                      # CPU: every layout, results/parallel.json
    .venv/bin/python -m benchmarks.parallel --device cuda        # GPU: layouts that fit the visible GPUs

Each layout is one ``torchrun`` launch (``--nproc-per-node`` = world size; a plain process for one
rank) of this module's ``worker``: load, one warm-up request, then ``--repeats`` timed requests; the
time is rank 0's ``generate`` wall time (all ranks finish the same request together). Launches
alternate layouts in rounds (A B C D E, A B C D E, ...) so a noisy machine hits them alike; the
median over all timed requests is reported, with the processes x threads used, the machine's load
average, and max |diff| of each layout's output against the one-process output.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# name: (processes, threads per process, engine options)
LAYOUTS = {
    "1 proc x 1 thread": (1, 1, {}),
    "1 proc x 2 threads": (1, 2, {}),
    "sp2 (2 procs x 1 thread)": (2, 1, {"sp_degree": 2}),
    "cfg (2 procs x 1 thread)": (2, 1, {"cfg_parallel": True}),
    "sp2+cfg (4 procs x 1 thread)": (4, 1, {"sp_degree": 2, "cfg_parallel": True}),
}


def params_for(name: str, steps: int, frames: int) -> dict:
    from .workloads import NEGATIVE, WORKLOADS

    p = dict(WORKLOADS[name].params, num_inference_steps=steps, seed=0)
    if name == "flux":  # true CFG, so there are two branches to split
        p.update(negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    if name == "wan":
        p.update(num_frames=frames)
    return p


def worker(argv: list[str]) -> int:
    """Under torchrun (or alone): load, warm up, time ``repeats`` requests; rank 0 writes a JSON report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--params", required=True)
    ap.add_argument("--engine", default="{}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    from diffcore import DiffGenerator

    gen = DiffGenerator.from_pretrained(a.model, device=a.device, dtype="float32", progress=False,
                                        **json.loads(a.engine))
    params = dict(json.loads(a.params), output_type="np")
    gen.generate(**params)  # warm-up
    times, output = [], None
    for _ in range(a.repeats):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = gen.generate(**params).output
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if gen.rank == 0:
        np.save(a.out + ".npy", output)
        Path(a.out + ".json").write_text(json.dumps({"times": times, "threads": torch.get_num_threads()}))
    if gen.pipeline.parallel is not None:
        gen.pipeline.parallel.close()
    return 0


def launch(folder: Path, params: dict, nproc: int, threads: int, engine: dict, device: str, repeats: int,
           out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    args = ["-m", "benchmarks.parallel", "worker", "--model", str(folder), "--params", json.dumps(params),
            "--engine", json.dumps(engine), "--device", device, "--repeats", str(repeats), "--out", out]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out + ".json").read_text())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="flux,wan")
    ap.add_argument("--flux-steps", type=int, default=8)
    ap.add_argument("--wan-steps", type=int, default=4)
    ap.add_argument("--wan-frames", type=int, default=17)
    ap.add_argument("--rounds", type=int, default=2, help="launches per layout (alternating layouts)")
    ap.add_argument("--repeats", type=int, default=2, help="timed requests per launch (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated layout names")
    ap.add_argument("--output", default=str(RESULTS / "parallel.json"))
    a = ap.parse_args(argv)
    from .workloads import checkpoint

    layouts = {n: LAYOUTS[n] for n in a.layouts.split(",")}
    if a.device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            print("no GPU visible: skipping the GPU parallel benchmark")
            return 0
        layouts = {n: v for n, v in layouts.items() if v[0] <= gpus and v[1] == 1}
    report = {"machine": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg(), "device": a.device},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "workloads": {}}
    tmp = Path(tempfile.mkdtemp(prefix="diffcore-parallel-"))
    for name in a.workloads.split(","):
        folder = checkpoint(name)
        steps = a.flux_steps if name == "flux" else a.wan_steps
        params = params_for(name, steps, a.wan_frames)
        times: dict[str, list[float]] = {n: [] for n in layouts}
        outputs: dict[str, str] = {}
        for r in range(a.rounds):
            for n, (nproc, threads, engine) in layouts.items():
                out = str(tmp / f"{name}-{r}-{list(layouts).index(n)}")
                res = launch(folder, params, nproc, threads, engine, a.device, a.repeats, out)
                times[n] += res["times"]
                outputs[n] = out + ".npy"
                print(f"{name} round {r} {n}: {', '.join(f'{t:.2f}' for t in res['times'])} s", flush=True)
        base_name = next(iter(layouts))
        base = np.load(outputs[base_name])
        rows = {}
        for n in layouts:
            out = np.load(outputs[n])
            rows[n] = {"median_s": statistics.median(times[n]), "times": times[n],
                       "speedup_vs_first": statistics.median(times[base_name]) / statistics.median(times[n]),
                       "max_abs_diff_vs_first": float(np.abs(out - base).max()),
                       "processes": layouts[n][0], "threads_per_process": layouts[n][1]}
        report["workloads"][name] = {"params": params, "layouts": rows}
    report["machine"]["load_at_end"] = os.getloadavg()
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = ["| workload | layout | processes x threads | median s | vs first row | max abs diff vs first |",
             "|---|---|---|---|---|---|"]
    for name, w in report["workloads"].items():
        for n, r in w["layouts"].items():
            lines.append(f"| {name} | {n} | {r['processes']} x {r['threads_per_process']} | {r['median_s']:.2f} | "
                         f"{r['speedup_vs_first']:.2f}x | {r['max_abs_diff_vs_first']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
