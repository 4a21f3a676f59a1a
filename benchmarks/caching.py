"""Step caching side by side with cache-dit: speed-up over uncached diffusers vs PSNR to the uncached output.

    .venv/bin/python -m benchmarks.caching            # FLUX-medium and Wan-medium, writes results/caching.json + caching.png
    .venv/bin/python -m benchmarks.caching --quick    # smoke run (few steps, two settings each)

cache-dit (``pip install 'diffcore[bench]'``, a benchmark-only peer, never imported by diffcore) wraps the
diffusers pipeline on the same weights; diffcore runs its own fbcache / teacache policies. Every cached
run is paired with an uncached diffusers run right before it (the machine is shared and noisy), and
its speed-up is that pair's time ratio. PSNR: cache-dit against uncached diffusers, diffcore against
uncached diffcore (the two uncached outputs agree to >110 dB PSNR), on [0, 1] pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import RESULTS, TMP, Worker, compare, log, machine  # noqa: E402
from benchmarks.workloads import WORKLOADS, checkpoint  # noqa: E402

# cache-dit DBCache settings. F8B0 (its FLUX.1-dev default) needs >= 8 blocks; the medium models have
# 6 (FLUX: 2 double + 4 single) and 4 (Wan), so F1B0 is used. The random-weight medium models change
# more from step to step than trained ones (first-block residual diff ~0.5 at 8 steps, measured), so
# thresholds that skip anything here are higher than the 0.08-0.12 used on FLUX.1-dev; both engines
# get the same grid.
def cache_dit_settings(warmup: int) -> list[dict]:
    out = []
    for fn, bn, thr, ts in [(1, 0, 0.3, 0), (1, 0, 0.45, 0), (1, 0, 0.3, 1)]:
        label = f"DBCache F{fn}B{bn} {thr}" + (" +TaylorSeer" if ts else "")
        out.append({"label": label, "cache": {"cache_dit": dict(Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                                                                residual_diff_threshold=thr, max_warmup_steps=warmup),
                                              "taylorseer": ts}})
    return out


DIFFCORE = [("fbcache", 0.3), ("fbcache", 0.45), ("teacache", 0.8)]
# Step counts where caching has room: FLUX 28 steps as in the main benchmark, Wan 20 steps (the main
# benchmark's 10 leave nothing to skip after a warm-up). Sizes are smaller than the main benchmark's
# (FLUX 128x128 with 64 text tokens, Wan 9 frames at 128x128) so that all settings fit on the shared
# 2-core machine; a step cache's speed-up is a ratio of transformer calls, so it transfers.
SETUP = {"flux": dict(params=dict(height=128, width=128, max_sequence_length=64), warmup=8),
         "wan": dict(params=dict(num_frames=9, height=128, width=128, num_inference_steps=20), warmup=4)}


def run_workload(name: str, args, save=lambda res: None) -> dict:
    w = WORKLOADS[name]
    params = {**w.params, **SETUP[name]["params"], **(dict(num_inference_steps=8) if args.quick else {})}
    warmup = 2 if args.quick else SETUP[name]["warmup"]
    folder = checkpoint(name, log=log)
    df, dc = (Worker(e, folder, w.pipeline, "fp32", args.threads) for e in ("diffusers", "diffcore"))
    for worker in (df, dc):
        worker.call("load")
        worker.call("run", params=params)  # warm-up
    ref = {e: TMP / f"cache-{name}-{e}-ref.npy" for e in ("diffusers", "diffcore")}
    df_ref = df.call("run", params=params, out=str(ref["diffusers"]))
    dc_ref = dc.call("run", params=params, out=str(ref["diffcore"]))
    rows = [{"engine": "diffusers", "label": "uncached", "speedup": 1.0, "psnr_db": None, "total_s": df_ref["total_s"]},
            {"engine": "diffcore", "label": "uncached", "speedup": df_ref["total_s"] / dc_ref["total_s"],
             "psnr_db": None, "total_s": dc_ref["total_s"], "vs_diffusers": compare(ref["diffcore"], ref["diffusers"])}]
    cases = [] if args.only_diffcore else [("diffusers", s["label"], s["cache"]) for s in cache_dit_settings(warmup)]
    cases += [("diffcore", f"{p} {t}", {"name": p, "threshold": t}) for p, t in (args.diffcore or DIFFCORE)]
    if args.quick:
        cases = cases[:1] + cases[-2:-1]
    for engine, label, cache in cases:
        base = df.call("run", params=params)
        out = TMP / f"cache-{name}-{engine}-{label.replace(' ', '_')}.npy"
        res = (df if engine == "diffusers" else dc).call("run", params=params, cache=cache, out=str(out))
        row = {"engine": engine, "label": label, "cache": cache, "total_s": res["total_s"], "baseline_s": base["total_s"],
               "speedup": base["total_s"] / res["total_s"],
               "denoise_speedup": base["stages"]["denoising"] / res["stages"]["denoising"],
               "stats": res["stages"].get("cache_stats"), **compare(out, ref[engine])}
        log(f"{name} {engine} {label}: {row['speedup']:.2f}x, PSNR {row['psnr_db']:.1f} dB")
        rows.append(row)
        save({"params": params, "warmup_steps_cache_dit": warmup, "rows": rows, "partial": True})
    for worker in (df, dc):
        worker.close()
    return {"params": params, "warmup_steps_cache_dit": warmup, "rows": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (name, res) in zip(list(axes) if len(results) > 1 else [axes], results.items()):
        for engine, marker in (("diffusers", "o"), ("diffcore", "s")):
            pts = sorted((r["speedup"], min(r["psnr_db"], 80)) for r in res["rows"] if r["engine"] == engine and r["psnr_db"])
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle="none",
                        label="cache-dit on diffusers" if engine == "diffusers" else "diffcore fbcache / teacache")
            for r in res["rows"]:
                if r["engine"] == engine and r["psnr_db"]:
                    ax.annotate(r["label"].replace("DBCache ", ""), (r["speedup"], min(r["psnr_db"], 80)), fontsize=6)
        ax.set_title(f"{name}-medium ({res['params']['num_inference_steps']} steps)")
        ax.set_xlabel("end-to-end speed-up over uncached diffusers")
        ax.set_ylabel("PSNR to the engine's uncached output (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = ["| workload | engine | setting | speed-up vs uncached diffusers | denoise speed-up | PSNR dB | calls run / skipped |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for r in res["rows"]:
            stats = r.get("stats") or {}
            calls = f"{stats['computed']} / {stats['skipped']}" if "computed" in stats else "–"
            psnr = "–" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
            den = f"{r['denoise_speedup']:.2f}x" if "denoise_speedup" in r else "–"
            engine = "cache-dit (diffusers)" if r["engine"] == "diffusers" and r["label"] != "uncached" else r["engine"]
            lines.append(f"| {name} | {engine} | {r['label']} | {r['speedup']:.2f}x | {den} | {psnr} | {calls} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="flux,wan")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--diffcore", type=lambda v: [(p, float(t)) for p, t in (x.split("@") for x in v.split(","))],
                    default=None, help="diffcore settings policy@threshold,... instead of the default grid")
    ap.add_argument("--only-diffcore", action="store_true", help="skip the cache-dit settings")
    ap.add_argument("--stem", default=None, help="results file stem (default caching / caching-quick)")
    ap.add_argument("--merge", action="store_true",
                    help="only combine results/caching-<workload>.json files into caching.json, the table and the plot")
    args = ap.parse_args(argv)
    TMP.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("caching-quick" if args.quick else "caching")
    if not args.merge:
        import cache_dit

        for name in args.workloads.split(","):  # one file per workload, rewritten after every case
            path = RESULTS / f"{stem}-{name}.json"
            head = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": os.getloadavg(),
                    "threads": args.threads, "cache_dit": cache_dit.__version__}

            def save(res, head=head, path=path):
                path.write_text(json.dumps({**head, "load_avg_now": os.getloadavg(), "result": res}, indent=1) + "\n")

            save(run_workload(name, args, save) | {"partial": False})
    parts = {name: json.loads((RESULTS / f"{stem}-{name}.json").read_text()) for name in args.workloads.split(",")
             if (RESULTS / f"{stem}-{name}.json").is_file()}
    results = {name: p["result"] for name, p in parts.items()}
    (RESULTS / f"{stem}.json").write_text(json.dumps(parts, indent=1) + "\n")
    plot(results, HERE / f"{stem}.png")
    print(table(results))


if __name__ == "__main__":
    main()
