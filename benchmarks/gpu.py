"""Prepared GPU benchmark: real-size FLUX.1-dev, FLUX.2 [dev] / [klein] 4B, Wan 2.1 T2V-1.3B, LTX-2 and Z-Image-Turbo transformers, diffcore vs diffusers.

    python -m benchmarks.gpu                      # on a CUDA machine: < 8 min on one H200; writes results/gpu.json + gpu.md
    python -m benchmarks.gpu --tiny --device cpu  # the same code path on tiny configs (what the test runs)

Both engines get the same random bf16 weights: the diffusers model is built on the meta device, its
tensors are materialised on the GPU with a scaled normal init, and the diffcore model is assigned the
very same tensors (no second copy). Each case runs the same flow-matching Euler loop over the
transformer with the same noise and random text embeddings (no text encoders or VAE: the transformer
is >95% of the time at these sizes):

* FLUX.1-dev transformer (12B), 1024x1024 (4096 image + 512 text tokens), 28 steps, guidance 3.5;
* Wan 2.1 T2V-1.3B transformer, 480x832x81 frames (32,760 tokens), 4 steps with CFG (8 calls);
* FLUX.2 [dev] transformer (32B, 64 GB in bf16: needs an 80 GB GPU), 1024x1024 (4096 image + 512 text
  tokens), 10 steps, embedded guidance 4.0 (``--families flux2``; its fp8 variant is skipped below 3x the
  weights of free memory, as it builds a second copy);
* FLUX.2 [klein] 4B transformer, 1024x1024 with one 1024x1024 reference image (8192 image + 512 text
  tokens), its recipe's 4 steps, no guidance (``--families klein4b``);
* LTX-2 transformer (19B: video and audio streams), 512x768x121 frames with sound, 4 steps with CFG (8 calls)
  (``gpu_ltx.py``);
* Z-Image-Turbo transformer (6B), 1024x1024 (4096 image + 100 caption tokens), its recipe's 8 steps, no CFG
  (``gpu_zimage.py``).

Measured per case: seconds per step (median over the steps), peak GPU memory (and its part above
the weights), and PSNR of diffcore's final latents against diffusers' (peak = the reference's range).
Variants: eager; ``torch.compile`` of each engine's transformer; each SDPA backend available
(flash, efficient, cudnn) for diffcore; torchao fp8 (dynamic activations) on compute capability
>= 8.9; diffcore with ``offload="layers"`` (blocks copied from pinned CPU memory, prefetch on a side
stream). A time budget (``--budget``, default 420 s) skips what no longer fits; skipped variants are
recorded as such. Without a CUDA device (and without ``--device cpu``) the script writes
``{"skipped": ...}`` and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import gpu_ltx, gpu_zimage  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)
KLEIN_4B = {**FLUX2_DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
            "joint_attention_dim": 7680, "guidance_embeds": False}
REAL = {"flux": FLUX_DEV, "flux2": FLUX2_DEV, "klein4b": KLEIN_4B, "ltx": gpu_ltx.LTX_2, "zimage": gpu_zimage.Z_IMAGE_TURBO}
TINY = {"ltx": gpu_ltx.TINY_LTX, "zimage": gpu_zimage.TINY_ZIMAGE,
        "flux": {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2,
                 "joint_attention_dim": 64, "pooled_projection_dim": 32},
        "flux2": {**FLUX2_DEV, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "joint_attention_dim": 64},
        "klein4b": {**KLEIN_4B, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "joint_attention_dim": 64},
        "wan": {**WAN_1_3B, "num_attention_heads": 2, "text_dim": 64, "ffn_dim": 256, "num_layers": 2}}
SIZES = {"flux": dict(height=1024, width=1024, steps=28, n_txt=512),
         "flux2": dict(height=1024, width=1024, steps=10, n_txt=512, refs=0),
         "klein4b": dict(height=1024, width=1024, steps=4, n_txt=512, refs=1),
         "wan": dict(frames=81, height=480, width=832, steps=4, n_txt=512), "ltx": gpu_ltx.SIZE,
         "zimage": gpu_zimage.SIZE}
TINY_SIZES = {"flux": dict(height=128, width=128, steps=3, n_txt=16),
              "flux2": dict(height=128, width=128, steps=3, n_txt=16, refs=0),
              "klein4b": dict(height=128, width=128, steps=2, n_txt=16, refs=1),
              "wan": dict(frames=5, height=64, width=64, steps=2, n_txt=16), "ltx": gpu_ltx.TINY_SIZE,
              "zimage": gpu_zimage.TINY_SIZE}


def log(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models
def random_weights_(model: torch.nn.Module, device, dtype, seed: int = 0) -> None:
    """Materialise a meta-device model on ``device`` with N(0, 1/fan_in) weights, small biases, unit norms."""
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0, fan_in ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.zero_()
    model.to(dtype)


def build_pair(family: str, cfg: dict, device, dtype):
    """(diffusers model, diffcore model) sharing one set of random weights."""
    import diffusers

    if family == "flux":
        from diffcore_flux.transformer import FluxTransformer2DModel as Ours

        Ref = diffusers.FluxTransformer2DModel
    elif family == "ltx":
        Ref, Ours = gpu_ltx.classes()
    elif family == "zimage":
        Ref, Ours = gpu_zimage.classes()
    elif family in FLUX2_FAMILIES:
        from diffcore_flux.flux2_transformer import Flux2Transformer2DModel as Ours

        Ref = diffusers.Flux2Transformer2DModel
    else:
        from diffcore_wan.transformer import WanTransformer3DModel as Ours

        Ref = diffusers.WanTransformer3DModel
    with torch.device("meta"):
        ref = Ref(**cfg)
    random_weights_(ref, device, dtype)
    ref.eval().requires_grad_(False)
    ours = Ours.from_config({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, device="meta")
    ours.load_state_dict(ref.state_dict(), assign=True, strict=True)
    for sub in ours.modules():  # non-persistent tables (RoPE frequencies) are recomputed on the device
        hook = getattr(sub, "_init_buffers", None)
        if callable(hook) and any(b.is_meta for b in sub.buffers()):
            hook(torch.device(device))
    return ref.eval(), ours.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ inputs
def flux_case(size: dict, cfg: dict, device, dtype):
    h, w = size["height"] // 16, size["width"] // 16  # VAE 8x, then 2x2 packing
    g = torch.Generator(device).manual_seed(0)
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    latents = torch.randn(1, h * w, cfg["in_channels"], generator=g, device=device, dtype=dtype)
    cond = dict(encoder_hidden_states=torch.randn(1, size["n_txt"], cfg["joint_attention_dim"], generator=g, device=device, dtype=dtype),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.5, device=device), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(size["n_txt"], 3, device=device))
    return latents, [cond], 1.0


FLUX2_FAMILIES = ("flux2", "klein4b")


def flux2_case(size: dict, cfg: dict, device, dtype):
    """Target tokens, then ``refs`` reference images of the target's size (RoPE t = 10, 20, ...) as fixed tokens."""
    from diffcore_flux.flux2_configs import position_ids

    h, w = size["height"] // 16, size["width"] // 16
    g = torch.Generator(device).manual_seed(0)
    grids = [position_ids(h, w, 0, device)] + [position_ids(h, w, 10 + 10 * i, device) for i in range(size["refs"])]
    txt_ids = torch.zeros(size["n_txt"], 4, device=device)
    txt_ids[:, 3] = torch.arange(size["n_txt"], device=device)
    latents = torch.randn(1, h * w, cfg["in_channels"], generator=g, device=device, dtype=dtype)
    refs = torch.randn(1, h * w * size["refs"], cfg["in_channels"], generator=g, device=device, dtype=dtype)
    guidance = torch.full((1,), 4.0, device=device) if cfg["guidance_embeds"] else None
    cond = dict(encoder_hidden_states=torch.randn(1, size["n_txt"], cfg["joint_attention_dim"], generator=g,
                                                  device=device, dtype=dtype),
                guidance=guidance, img_ids=torch.cat(grids), txt_ids=txt_ids, refs=refs)
    return latents, [cond], 1.0


def wan_case(size: dict, cfg: dict, device, dtype):
    f, h, w = (size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, cfg["in_channels"], f, h, w, generator=g, device=device, dtype=torch.float32)
    conds = [dict(encoder_hidden_states=torch.randn(1, size["n_txt"], cfg["text_dim"], generator=g, device=device, dtype=dtype))
             for _ in range(2)]  # cond, uncond (CFG 5.0)
    return latents, conds, 5.0


def denoise(call, latents, conds, scale: float, steps: int, timestep_scale: float, sync) -> tuple[torch.Tensor, list[float]]:
    """Euler flow matching over ``steps`` (sigmas 1 -> 0), CFG when two conditions are given."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x, times = latents.clone(), []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        t = torch.full((x.shape[0],), float(sigmas[i]) * timestep_scale, device=x.device)
        preds = [call(x, t, c).float() for c in conds]
        v = preds[0] if len(preds) == 1 else preds[1] + scale * (preds[0] - preds[1])
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(x.dtype)
        sync()
        times.append(time.perf_counter() - t0)
    return x, times


def callers(family: str, ref, ours, latents, conds):
    """(diffusers call, diffcore call) with each engine's per-request precomputation done once."""
    if family == "flux":
        rope = ours.rope(conds[0]["img_ids"], conds[0]["txt_ids"])

        def call_ref(x, t, c):
            return ref(hidden_states=x, timestep=t, return_dict=False, **c)[0]

        def call_ours(x, t, c):
            kw = {k: v for k, v in c.items() if not k.endswith("_ids")}
            return ours(hidden_states=x, timestep=t, rotary_emb=rope, **kw)

        return call_ref, call_ours, 1.0
    if family == "ltx":
        return gpu_ltx.callers(ref, ours, latents, conds)
    if family == "zimage":
        return gpu_zimage.callers(ref, ours, latents, conds)
    if family in FLUX2_FAMILIES:  # references appended to the target tokens, their predictions dropped
        rope = ours.rope(conds[0]["img_ids"], conds[0]["txt_ids"])

        def call_ref(x, t, c):
            kw = {k: v for k, v in c.items() if k != "refs"}
            return ref(hidden_states=torch.cat([x, c["refs"]], 1), timestep=t, return_dict=False, **kw)[0][:, :x.shape[1]]

        def call_ours(x, t, c):
            kw = {k: v for k, v in c.items() if not k.endswith("_ids") and k != "refs"}
            return ours(hidden_states=torch.cat([x, c["refs"]], 1), timestep=t, rotary_emb=rope, **kw)[:, :x.shape[1]]

        return call_ref, call_ours, 1.0
    from diffcore_wan.transformer import ContextCache

    _, _, f, h, w = latents.shape
    rope = ours.rope(f, h, w, device=latents.device)
    caches = [ContextCache() for _ in conds]
    dtype = conds[0]["encoder_hidden_states"].dtype

    def call_ref(x, t, c):
        return ref(hidden_states=x.to(dtype), timestep=t, return_dict=False, **c)[0]

    def call_ours(x, t, c):
        cache = caches[next(i for i, cc in enumerate(conds) if cc is c)]
        return ours(hidden_states=x.to(dtype), timestep=t, rotary_emb=rope, context_cache=cache, **c)

    return call_ref, call_ours, 1000.0


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    mse = float(((x - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


# ------------------------------------------------------------------------------------------ runner
class Bench:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def measure(self, family, engine, variant, call, latents, conds, scale, steps, tscale, ref_out=None,
                weights_bytes=0, need_s=0.0):
        if self.left() < need_s:
            self.rows.append(dict(family=family, engine=engine, variant=variant, skipped="over the time budget"))
            log(f"{family} {engine} {variant}: skipped (budget)")
            return None
        try:
            with torch.inference_mode():
                call(latents if latents.ndim != 5 else latents.to(conds[0]["encoder_hidden_states"].dtype),
                     torch.ones(1, device=latents.device) * tscale * 0.5, conds[0])  # warm-up (compiles when compiled)
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device) if self.cuda else 0
                out, times = denoise(call, latents, conds, scale, steps, tscale, self.sync)
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        except Exception as e:  # record and go on: one failing variant must not lose the others
            self.rows.append(dict(family=family, engine=engine, variant=variant, error=f"{type(e).__name__}: {e}"[:300]))
            log(f"{family} {engine} {variant}: {type(e).__name__}: {e}")
            return None
        row = dict(family=family, engine=engine, variant=variant, step_s=statistics.median(times), steps=steps,
                   total_s=sum(times), peak_gb=peak / 2**30, peak_over_start_gb=(peak - base) / 2**30,
                   weights_gb=weights_bytes / 2**30)
        if ref_out is not None:
            row["psnr_vs_diffusers_db"] = psnr(out, ref_out)
        self.rows.append(row)
        log(f"{family} {engine} {variant}: {row['step_s']:.3f} s/step, peak {row['peak_gb']:.1f} GB"
            + (f", PSNR {row['psnr_vs_diffusers_db']:.1f} dB" if ref_out is not None else ""))
        return out

    def family(self, family: str) -> None:
        args, dtype = self.args, torch.bfloat16
        cfg = TINY[family] if args.tiny else REAL.get(family, WAN_1_3B)
        size = (TINY_SIZES if args.tiny else SIZES)[family]
        steps = args.steps or size["steps"]
        log(f"building {family} ({'tiny' if args.tiny else 'real size'}) on {self.device}")
        ref, ours = build_pair(family, cfg, self.device, dtype)
        weights = sum(p.numel() * p.element_size() for p in ref.parameters())
        case = {"flux": flux_case, "flux2": flux2_case, "klein4b": flux2_case, "ltx": gpu_ltx.case,
                "zimage": gpu_zimage.case}.get(family, wan_case)
        latents, conds, scale = case(size, cfg, self.device, dtype)
        call_ref, call_ours, tscale = callers(family, ref, ours, latents, conds)
        run = dict(latents=latents, conds=conds, scale=scale, steps=steps, tscale=tscale, weights_bytes=weights)
        ref_out = self.measure(family, "diffusers", "eager", call_ref, **run)
        self.measure(family, "diffcore", "eager", call_ours, ref_out=ref_out, **run)
        if self.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                backend = getattr(SDPBackend, name, None)
                if backend is None:
                    continue

                def call_backend(x, t, c, _b=backend):
                    with sdpa_kernel(_b):
                        return call_ours(x, t, c)

                self.measure(family, "diffcore", f"sdpa {name.lower()}", call_backend, ref_out=ref_out, need_s=20, **run)
        if args.compile:
            for engine, model, call in (("diffusers", ref, call_ref), ("diffcore", ours, call_ours)):
                model.compile()
                self.measure(family, engine, "torch.compile", call, ref_out=ref_out if engine == "diffcore" else None,
                             need_s=120 if not args.tiny else 0, **run)
                model._compiled_call_impl = None  # back to eager for the rest
        free = torch.cuda.mem_get_info(self.device)[0] if self.cuda else 0
        if self.cuda and free < 2 * weights:  # fp8 builds a second pair while this one is alive
            self.rows.append(dict(family=family, engine="diffcore", variant="fp8", skipped="not enough free GPU memory"))
        elif self.cuda and torch.cuda.get_device_capability(self.device) >= (8, 9):
            self.fp8(family, cfg, ref_out, run)
        else:
            self.rows.append(dict(family=family, engine="diffcore", variant="fp8", skipped="needs CUDA compute capability >= 8.9"))
        self.offload(family, ours, call_ours, ref_out, run)
        del ref, ours
        if self.cuda:
            torch.cuda.empty_cache()

    def fp8(self, family, cfg, ref_out, run) -> None:
        from diffcore.quantization import quantize_model

        if self.left() < 60:
            self.rows.append(dict(family=family, engine="both", variant="fp8", skipped="over the time budget"))
            return
        ref, ours = build_pair(family, cfg, self.device, torch.bfloat16)
        quantize_model(ours, "fp8")
        import torchao.quantization as tq

        tq.quantize_(ref, tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow()))
        call_ref, call_ours, _ = callers(family, ref, ours, run["latents"], run["conds"])
        self.measure(family, "diffusers", "fp8 (torchao)", call_ref, ref_out=ref_out, **run)
        self.measure(family, "diffcore", "fp8 (torchao)", call_ours, ref_out=ref_out, **run)
        del ref, ours

    def offload(self, family, ours, call_ours, ref_out, run) -> None:
        """diffcore with its blocks in pinned CPU memory (offload="layers"), a few steps."""
        from diffcore.offload import LayerOffload, blocks_of

        cpu = torch.device("cpu")
        for block in blocks_of(ours):
            block.to(cpu)
        LayerOffload(ours, self.device, prefetch=1)
        steps = min(run["steps"], 3)
        self.measure(family, "diffcore", f"offload=layers ({steps} steps)", call_ours, need_s=60 if not self.args.tiny else 0,
                     **{**run, "steps": steps}, ref_out=None)


def table(rows: list[dict]) -> str:
    lines = ["| model | engine | variant | s/step | peak GB (above weights+inputs) | PSNR vs diffusers dB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "step_s" in r:
            psnr_s = f"{r['psnr_vs_diffusers_db']:.1f}" if "psnr_vs_diffusers_db" in r else "–"
            lines.append(f"| {r['family']} | {r['engine']} | {r['variant']} | {r['step_s']:.3f} | "
                         f"{r['peak_gb']:.1f} ({r['peak_over_start_gb']:.1f}) | {psnr_s} |")
        else:
            lines.append(f"| {r['family']} | {r['engine']} | {r['variant']} | – | – | {r.get('skipped') or r.get('error')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--families", default="flux,wan,klein4b,ltx,zimage",
                    help="flux, wan, klein4b, ltx (19B), zimage (Z-Image-Turbo 6B), flux2 (32B: 80 GB GPUs)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (code-path check, e.g. on the CPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; variants that no longer fit are skipped")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-tiny" if args.tiny else "gpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        result = {"skipped": "no CUDA device here: nothing measured", "torch": torch.__version__}
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(result["skipped"])
        return 0
    bench = Bench(args)
    for family in args.families.split(","):
        bench.family(family)
    import diffusers

    info = {"device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cuda": torch.version.cuda, "tiny": args.tiny,
            "seconds": time.perf_counter() - bench.start, "rows": bench.rows}
    (out / f"{stem}.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / f"{stem}.md").write_text(f"Device: {info['device']}, torch {info['torch']}, diffusers {info['diffusers']}, "
                                    f"{info['seconds']:.0f} s in all.\n\n" + table(bench.rows) + "\n")
    print(table(bench.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
