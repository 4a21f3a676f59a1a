"""Quantized and GGUF transformers on the CPU: peak memory, step time and PSNR against the unquantized output.

    .venv/bin/python -m benchmarks.quant                 # FLUX, Qwen-Image and Wan medium; results/quant-flux-qwen-wan.json
    .venv/bin/python -m benchmarks.quant --families flux --steps 4
    .venv/bin/python -m benchmarks.quant --families qwen,wan --configs int8_weight_only --stored fp32

Each row is diffcore in a fresh worker process (so peak RSS is that configuration's own): bf16
weights (the bf16-stored checkpoint, as the public ones ship) unquantized, torchao int8 / fp8
weight-only, and the transformer from GGUF files written from the same weights (Q8_0 with the
``gguf`` package's quantizer; Q4_K with diffcore.testing.gguf's plain min/max packer, which is
coarser than llama.cpp's). Configurations run one after another (not interleaved: each needs its own
process for its peak RSS), so step times carry the machine's noise; the step time is the median
denoising time per step of ``--runs`` runs after a warm-up. PSNR: [0, 1] pixels against the
unquantized bf16 output with the same seed. Memory: VmRSS right after ``from_pretrained``, VmHWM
then (the load's peak), VmRSS after the runs (weights in use, plus the allocator's cached
activations) and VmHWM at the end (the process's peak).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.run import RESULTS, TMP, Worker, compare, log, machine  # noqa: E402
from benchmarks.workloads import WORKLOADS, checkpoint  # noqa: E402

CONFIGS = [("bf16", {}), ("int8_weight_only", {"quantization": "int8_weight_only"}),
           ("fp8_weight_only", {"quantization": "fp8_weight_only"}), ("gguf Q8_0", {"gguf": "Q8_0"}),
           ("gguf Q4_K", {"gguf": "Q4_K"})]
SHORT = {"flux": dict(num_inference_steps=8), "qwen": dict(num_inference_steps=6),
         "wan": dict(num_inference_steps=6, num_frames=9)}


def gguf_file(folder: Path, qtype: str) -> Path:
    """The checkpoint's transformer written as a ``qtype`` GGUF file beside it (once)."""
    from safetensors.torch import load_file

    from diffcore.loader.weight_files import find_weight_files
    from diffcore.testing.gguf import write_gguf

    path = folder.with_name(f"{folder.name}-transformer-{qtype}.gguf")
    if not path.is_file():
        state = {}
        for f in find_weight_files(folder / "transformer"):
            state.update(load_file(f))
        write_gguf(state, path, qtype)
    return path


def run_family(name: str, args, save=lambda rows: None) -> list[dict]:
    w = WORKLOADS[name]
    params = {**w.params, **SHORT[name], **({"num_inference_steps": args.steps} if args.steps else {})}
    steps = params["num_inference_steps"]
    folder = checkpoint(name, "bf16" if args.stored == "bf16" else "fp32", log=log)
    rows, ref_out = [], TMP / f"quant-{name}-{args.stored}-ref.npy"
    configs = [(label, extra) for label, extra in CONFIGS if not args.configs or label in args.configs.split(",")]
    if configs[0][0] != "bf16":
        configs.insert(0, CONFIGS[0])  # the reference output
    for label, extra in configs:
        if "gguf" in extra:
            extra = {"gguf": str(gguf_file(checkpoint(name, log=log), extra["gguf"]))}
        worker = Worker("diffcore", folder, w.pipeline, "bf16", args.threads, engine_args=extra)
        loaded = worker.call("load")
        worker.call("run", params=params)  # warm-up
        out = ref_out if label == "bf16" else TMP / f"quant-{name}-{args.stored}-{label.replace(' ', '_')}.npy"
        runs = [worker.call("run", params=params, out=str(out) if i == 0 else None) for i in range(args.runs)]
        status = worker.close()
        step = statistics.median(r["stages"]["denoising"] for r in runs) / steps
        row = {"family": name, "stored": args.stored, "config": label, "step_s": step,
               "peak_rss_mb": status["vmhwm_mb"], "load_peak_rss_mb": loaded.get("vmhwm_mb"),
               "rss_after_load_mb": loaded.get("vmrss_mb"), "rss_after_runs_mb": status.get("vmrss_mb"),
               "load_s": loaded["load_s"], "transformer_mb": loaded.get("transformer_mb")}
        if label != "bf16":
            row.update(compare(out, ref_out))
        log(f"{name} {label}: {step:.3f} s/step, peak RSS {row['peak_rss_mb']:.0f} MB"
            + (f", PSNR {row['psnr_db']:.1f} dB" if "psnr_db" in row else ""))
        rows.append(row)
        save(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| family | stored | weights | transformer MB | s/step | RSS after load MB | peak RSS in load MB "
             "| RSS after runs MB | peak RSS MB | PSNR vs bf16 dB |", "|---|---|---|---|---|---|---|---|---|---|"]

    def mb(r, key):
        return f"{r[key]:.0f}" if r.get(key) is not None else "–"

    for r in rows:
        psnr = f"{r['psnr_db']:.1f}" if "psnr_db" in r else "–"
        lines.append(f"| {r['family']} | {r.get('stored', 'bf16')} | {r['config']} | {mb(r, 'transformer_mb')} | "
                     f"{r['step_s']:.3f} | {mb(r, 'rss_after_load_mb')} | {mb(r, 'load_peak_rss_mb')} | "
                     f"{mb(r, 'rss_after_runs_mb')} | {mb(r, 'peak_rss_mb')} | {psnr} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="flux,qwen,wan")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--configs", default="", help=f"comma-separated subset of: {', '.join(c for c, _ in CONFIGS)} "
                    "(bf16, the reference, always runs)")
    ap.add_argument("--stored", choices=("bf16", "fp32"), default="bf16",
                    help="checkpoint precision: bf16 (mapped lazily) or fp32 (converted to bf16 while loading)")
    args = ap.parse_args(argv)
    TMP.mkdir(parents=True, exist_ok=True)
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    head = {"machine": machine(), "started": started, "load_avg_start": load_start, "threads": args.threads}
    done: list[dict] = []

    def save(rows):  # after every row, so an interrupted run keeps what it measured
        out = {**head, "load_avg_now": os.getloadavg(), "rows": done + rows}
        stem = f"quant-{args.families.replace(',', '-')}" + ("-fp32" if args.stored == "fp32" else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")

    for name in args.families.split(","):
        done += run_family(name, args, save)
    rows = done
    print(table(rows))


if __name__ == "__main__":
    main()
