"""Measure prompt following of a demo model folder, or of a training run's latest checkpoint.

    python plugins/diffcore-demo/training/evaluate.py --model plugins/diffcore-demo/diffcore_demo/model
    python plugins/diffcore-demo/training/evaluate.py --run /tmp/demo_run     # EMA of the last checkpoint

Uses the same classifier as the prompt-following test (``diffcore_demo.shapes.classify``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def export_checkpoint(run: Path, folder: Path, dtype: torch.dtype = torch.float16) -> int:
    import train as T

    data = torch.load(run / "latents.pt")
    model = T.FluxTransformer2DModel(**T.TRANSFORMER_CONFIG)
    candidates = [torch.load(p) for p in (run / "transformer_ckpt.pt", run / "transformer_ema.pt") if p.exists()]
    candidates = [c if "ema" in c else {"ema": c, "step": 10**9} for c in candidates]  # plain EMA state dict
    state = max(candidates, key=lambda c: c["step"])
    model.load_state_dict(state["ema"])
    step = state["step"]
    vae = T.AutoencoderKL(**T.VAE_CONFIG)
    vae.load_state_dict(torch.load(run / "vae.pt"))
    stats = {"shift_factor": data["shift_factor"], "scaling_factor": data["scaling_factor"]}
    T.export(folder, vae, model, stats, T.build_text(0), dtype)
    return step


def measure(folder, n: int, seed: int, steps=None, dtype=None, grid=None, cfg=None) -> dict:
    from diffcore import DiffGenerator
    from diffcore_demo.shapes import classify, random_scene

    gen = DiffGenerator.from_pretrained(str(folder), dtype=dtype, progress=False)
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    t = time.time()
    extra = {} if cfg is None else {"true_cfg_scale": cfg}
    images = gen.generate(prompt=[s.caption for s in scenes], seed=seed, num_inference_steps=steps, output_type="np",
                          **extra).output
    elapsed = time.time() - t
    res = [classify(im) for im in images]
    if grid:
        from PIL import Image

        rows = [np.concatenate(list(images[i:i + 8]), 1) for i in range(0, n - n % 8, 8)]
        Image.fromarray((np.concatenate(rows, 0) * 255).round().astype(np.uint8)).save(grid)
        for i, s in enumerate(scenes):
            print(i, s.caption, "->", res[i]["colour"], res[i]["shape"], "on", res[i]["background"])
    rate = {k: float(np.mean([r[k] == getattr(s, a) for s, r in zip(scenes, res)]))
            for k, a in (("colour", "colour"), ("background", "background"), ("shape", "shape"))}
    rate["seconds"] = round(elapsed, 2)
    return rate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path)
    p.add_argument("--run", type=Path)
    p.add_argument("-n", type=int, default=48)
    p.add_argument("--seed", type=int, default=777_001)
    p.add_argument("--steps", type=int)
    p.add_argument("--dtype", help="run dtype (default: the model's)")
    p.add_argument("--store-dtype", default="float16", help="with --run: weight dtype of the exported checkpoint")
    p.add_argument("--cfg", type=float, nargs="*", help="true-CFG scales to measure (default: the model's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", help="save the generated images here (8 per row) and print each result")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        folder = Path(tempfile.mkdtemp()) / "model"
        print("checkpoint step", export_checkpoint(args.run, folder, getattr(torch, args.store_dtype)))
    else:
        folder = args.model
    for cfg in args.cfg or [None]:
        print(f"true_cfg_scale={cfg}:", measure(folder, args.n, args.seed, args.steps, args.dtype, args.grid, cfg))


if __name__ == "__main__":
    main()
