"""What previews cost (``generate(on_preview=...)``, the server's streamed partial images; diffcore/previews.py).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.previews [--size 1024] [--runs 3] [--device cuda] [--dtype bfloat16]

Two measurements, medians of ``--runs``: (1) one preview decode of a FLUX.1-size VAE (AutoencoderKL with FLUX's
configuration: 16 latent channels, 128/256/512/512 blocks, random weights: cost, not quality) at ``--size``, at full
size and on the grid ``previews.pooling_factor`` picks, the ratio being what a preview costs against the final
decode; (2) the demo model end to end (128x128, 20 steps) with and without 3 previews, runs alternated.
Writes ``benchmarks/results/previews.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).parent / "results" / "previews.json"


def _median(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vae_decode(size: int, runs: int, device: str, dtype: torch.dtype) -> dict:
    from diffcore import previews
    from diffcore.testing.checkpoints import tiny_autoencoder_kl

    vae = tiny_autoencoder_kl(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                              norm_num_groups=32, perturb=False).to(device, dtype)
    factor = previews.pooling_factor(SimpleNamespace(vae_scale_factor=8, latent_patch=2), size, size)  # FLUX's
    z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    with torch.inference_mode():
        vae.decode(torch.nn.functional.avg_pool2d(z, factor))  # warm-up
        full = _median(lambda: vae.decode(z), runs)
        pooled = _median(lambda: vae.decode(torch.nn.functional.avg_pool2d(z, factor)), runs)
    return {"size": size, "factor": factor, "full_s": full, "preview_s": pooled, "ratio": pooled / full}


def demo(runs: int) -> dict:
    from diffcore import DiffGenerator

    gen = DiffGenerator.from_pretrained("demo", progress=False)
    kw = dict(prompt="a red circle on a blue background", seed=1)
    gen.generate(**kw)  # warm-up
    plain, shown = [], []
    for _ in range(runs):
        plain.append(_median(lambda: gen.generate(**kw), 1))
        shown.append(_median(lambda: gen.generate(**kw, on_preview=lambda p: None, partial_images=3), 1))
    return {"plain_s": statistics.median(plain), "with_3_previews_s": statistics.median(shown),
            "overhead": statistics.median(shown) / statistics.median(plain) - 1}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out = {"machine": platform.processor() or platform.machine(), "device": args.device, "dtype": args.dtype,
           "vae": vae_decode(args.size, args.runs, args.device, getattr(torch, args.dtype))}
    if not args.skip_demo:
        out["demo"] = demo(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
