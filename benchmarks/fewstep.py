"""Few-step and causal sampling on the Wan-medium checkpoint (diffcore only; diffusers has neither).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.fewstep [--pairs 3] [--threads 1]

Same weights (the harness's Wan-medium folder, built once), prompt, seed and size (33 frames,
256x256), three ways: the standard 10-step UniPC run with CFG 5.0 (``WanPipeline``), a 3-step DMD
run (the same folder declared ``WanDMDPipeline``: FastWan's recipe) and the block-causal run
(``WanCausalDMDPipeline``: self-forcing's 4 warped steps per block of 3 latent frames, each block
decoded as soon as it is done). The weights are random, so this measures cost, not quality. Each
run is its own process (peak RSS = its VmHWM, weights included), after a small warm-up request;
modes alternate (A B C A B C ...) and medians are reported. Writes ``benchmarks/results/fewstep.json``.
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

RESULTS = Path(__file__).parent / "results" / "fewstep.json"
MODES = {"standard": "WanPipeline", "dmd": "WanDMDPipeline", "causal": "WanCausalDMDPipeline"}
PARAMS = dict(prompt="a red fox running through snow", height=256, width=256, num_frames=33, seed=0)
STANDARD = dict(negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=10)


def variant(folder: Path, mode: str) -> Path:
    """The checkpoint under another pipeline class: component folders linked, model_index rewritten."""
    if mode == "standard":
        return folder
    out = folder.with_name(f"{folder.name}-{mode}")
    if not (out / "model_index.json").is_file():
        out.mkdir(exist_ok=True)
        index = json.loads((folder / "model_index.json").read_text())
        for name in index:
            if not name.startswith("_") and (folder / name).is_dir() and not (out / name).exists():
                (out / name).symlink_to((folder / name).resolve())
        (out / "model_index.json").write_text(json.dumps({**index, "_class_name": MODES[mode]}, indent=2))
    return out


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def one(args) -> None:
    """Worker: load, warm up, run once; print a JSON line."""
    import torch

    from diffcore import DiffGenerator

    torch.set_num_threads(args.threads)
    # the variant folders link the standard folder's components (allowed explicitly: links leaving a model folder
    # are refused by default, docs/api.md)
    gen = DiffGenerator.from_pretrained(args.folder, dtype="float32", progress=False, allow_external_links=True)
    extra = STANDARD if args.mode == "standard" else {}
    warm = dict(prompt="warm up", height=64, width=64, num_frames=9, output_type="np", **extra)
    warm.update({"num_inference_steps": 1} if args.mode == "standard" else {"timesteps": [1000]})
    gen.generate(**warm)
    loaded_mb = _vmhwm_mb()
    first = []
    start = time.perf_counter()
    kwargs = dict(PARAMS, output_type="np", **extra)
    if args.mode == "causal":
        kwargs["block_callback"] = lambda block, latents, frames: first.append(time.perf_counter() - start)
    result = gen.generate(**kwargs)
    total = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "total_s": total, "first_block_s": first[0] if first else None,
                      "blocks": len(first), "stages": result.timings, "peak_rss_mb": _vmhwm_mb(),
                      "rss_after_warmup_mb": loaded_mb, "frames": result.output.shape[1]}))


def run(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from benchmarks.workloads import checkpoint

    folder = checkpoint("wan")
    rows = {m: [] for m in MODES}
    load0 = os.getloadavg()
    for pair in range(args.pairs):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.fewstep", "one", "--mode", mode, "--folder",
                                  str(variant(folder, mode)), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)})
            rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"pair {pair + 1} {mode}: {rows[mode][-1]['total_s']:.2f} s", flush=True)
    med = lambda mode, key: statistics.median(r[key] for r in rows[mode])  # noqa: E731
    summary = {m: {k: med(m, k) for k in ("total_s", "peak_rss_mb")} for m in MODES}
    summary["causal"]["first_block_s"] = med("causal", "first_block_s")
    for m in MODES:
        summary[m]["denoise_s"] = statistics.median(r["stages"]["denoising"] for r in rows[m])
        summary[m]["decode_s"] = statistics.median(r["stages"].get("decoding", r["stages"].get("block_decoding", 0.0))
                                                   for r in rows[m])
    RESULTS.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg(), "threads": args.threads,
                    "pairs": args.pairs, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "params": PARAMS, "summary": summary, "runs": rows}, indent=2))
    print(table(summary))


def table(s: dict) -> str:
    std, dmd, causal = s["standard"], s["dmd"], s["causal"]
    lines = ["| run | total s | denoising s | VAE decode s | peak RSS MB | vs standard |", "|---|---|---|---|---|---|",
             f"| standard: 10 UniPC steps, CFG 5 (20 model calls) | {std['total_s']:.2f} | {std['denoise_s']:.2f} | "
             f"{std['decode_s']:.2f} | {std['peak_rss_mb']:.0f} | 1.00x |",
             f"| DMD: 3 steps, no CFG (3 model calls) | {dmd['total_s']:.2f} | {dmd['denoise_s']:.2f} | "
             f"{dmd['decode_s']:.2f} | {dmd['peak_rss_mb']:.0f} | {std['total_s'] / dmd['total_s']:.2f}x |",
             f"| causal: 3 blocks x (4 steps + 1 cache pass), decoded per block | {causal['total_s']:.2f} | "
             f"{causal['denoise_s'] - causal['decode_s']:.2f} | {causal['decode_s']:.2f} (per block) | "
             f"{causal['peak_rss_mb']:.0f} | "
             f"{std['total_s'] / causal['total_s']:.2f}x |",
             "", f"Causal: first decoded block after {causal['first_block_s']:.2f} s of {causal['total_s']:.2f} s "
                 f"({100 * causal['first_block_s'] / causal['total_s']:.0f}%)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    o = sub.add_parser("one")
    o.add_argument("--mode", choices=list(MODES), required=True)
    o.add_argument("--folder", required=True)
    o.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    one(args) if args.cmd == "one" else run(args)


if __name__ == "__main__":
    main()
