"""Train the bundled demo model: a tiny FLUX-architecture text-to-image model for the shapes world.

    python plugins/diffcore-demo/training/train.py --out runs/demo \
        --export plugins/diffcore-demo/diffcore_demo/model
    # fine-tune a finished run (reuses its VAE, starts from its transformer EMA; new latent cache):
    python plugins/diffcore-demo/training/train.py --out runs/demo2 --init runs/demo \
        --num-images 8000 --steps 5000,1400 --lr 3e-4 --export plugins/diffcore-demo/diffcore_demo/model

Stages (each resumable: rerunning the same command continues from the last checkpoint in --out):
  1. text encoders: frozen random tiny CLIP + T5 over word-level tokenizers of the caption vocabulary;
  2. VAE (diffcore.models.AutoencoderKL, 8x down) on random scenes covering every colour pair;
  3. latent cache: a fixed set of rendered scenes encoded once (posterior mean), plus shift/scale;
  4. transformer (diffcore_flux FluxTransformer2DModel): flow matching (x_t = (1-s) x0 + s eps,
     target eps - x0) with logit-normal s, AdamW + cosine LR (restarted per --steps cycle), EMA;
     adding a cycle to --steps (e.g. 3500,4000,2000,8000) continues a finished run;
  5. export of the EMA weights in Diffusers format (model_index.json + config.json + safetensors).

Sampling with the exported scheduler is exactly what the FluxPipeline does, so nothing else is needed
to use the result: ``DiffGenerator.from_pretrained(folder)``. Everything is seeded (--seed); batches
are drawn from (seed, step), so a resumed run sees the data an uninterrupted one would. One thread by
default: on a shared 2-core machine two OpenMP threads per process made training up to 10x slower.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffcore.models.autoencoder_kl import AutoencoderKL
from diffcore.testing.text_encoders import tiny_clip_text_model, tiny_t5_encoder
from diffcore.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer
from diffcore_demo.shapes import COLOURS, SHAPES, VOCAB, Scene, random_scene, render
from diffcore_flux.transformer import FluxTransformer2DModel

SIZE = 128
MAX_SEQ = 12  # T5 tokens; kept from the first, broader grammar (11 tokens); captions now have 8
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 32, 32], layers_per_block=1,
                  act_fn="silu", latent_channels=8, norm_num_groups=4, sample_size=SIZE, scaling_factor=1.0,
                  shift_factor=0.0, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=False)
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=32, out_channels=None, num_layers=2, num_single_layers=4,
                          attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64,
                          pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=[8, 12, 12])
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
                        shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                        use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)
DIFFUSERS_VERSION = "0.42.1"


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * p))


def cycle_lr(step: int, cycles: list[int], peak: float, final: float, warmup: int) -> float:
    """Cosine schedule restarted at the start of each cycle (``--steps 3500,4000``: two cycles)."""
    for length in cycles:
        if step < length:
            return cosine_lr(step, length, peak, final, warmup)
        step -= length
    return final


def all_captions() -> list[str]:
    """Every caption the grammar can produce (the text embeddings are cached for all of them)."""
    return [Scene(colour, shape, bg).caption for colour in COLOURS for bg in COLOURS if bg != colour
            for shape in SHAPES]


# ------------------------------------------------------------------------------------------- text
def build_text(seed: int):
    clip_tok, t5_tok = tiny_clip_tokenizer(VOCAB), tiny_t5_tokenizer(VOCAB)
    clip = tiny_clip_text_model(clip_tok, hidden=64, layers=2, heads=2, projection_dim=64, seed=seed + 1)
    t5 = tiny_t5_encoder(t5_tok, d_model=64, layers=2, heads=2, seed=seed + 2)
    return clip_tok, clip, t5_tok, t5


@torch.no_grad()
def encode_text(captions: list[str], clip_tok, clip, t5_tok, t5):
    """(T5 hidden states (N, MAX_SEQ, 64), CLIP pooled (N, 64)) exactly as FluxDevConfig.encode_prompts."""
    embeds, pooled = [], []
    for i in range(0, len(captions), 256):
        batch = captions[i:i + 256]
        ids = clip_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pooled.append(clip(ids, output_hidden_states=False).pooler_output.float())
        ids = t5_tok(batch, padding="max_length", max_length=MAX_SEQ, truncation=True, return_tensors="pt").input_ids
        embeds.append(t5(ids, output_hidden_states=False)[0].float())
    return torch.cat(embeds), torch.cat(pooled)


# -------------------------------------------------------------------------------------------- VAE
def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def vae_batch(rng: np.random.Generator, n: int, crop: int) -> torch.Tensor:
    """n random scenes (every colour pair equally likely), randomly cropped to ``crop`` pixels."""
    out = []
    for _ in range(n):
        img = render(random_scene(rng), rng, SIZE, supersample=2)
        if crop < SIZE:
            y, x = rng.integers(0, SIZE - crop + 1, size=2)
            img = img[y:y + crop, x:x + crop]
        out.append(img)
    return to_pixels(np.stack(out))


def train_vae(args, out: Path) -> AutoencoderKL:
    final = out / "vae.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    if final.exists():
        vae.load_state_dict(torch.load(final))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=True)
    ckpt, step = out / "vae_ckpt.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"VAE: resuming at step {step}")
    last_save = time.time()
    bar = tqdm(range(step, args.vae_steps), desc="vae", initial=step, total=args.vae_steps, mininterval=5)
    for step in bar:
        rng = np.random.default_rng([args.seed, 1, step])
        crop = SIZE if step >= args.vae_steps * 0.8 else args.vae_crop  # finish on whole images (GroupNorm stats)
        x = vae_batch(rng, args.vae_batch if crop < SIZE else max(4, args.vae_batch // 4), crop)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, args.vae_lr / 10, 100)
        post = vae.encode(x)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z)
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).mean()
        loss = mse + F.l1_loss(rec, x) * 0.1 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))
        bar.set_postfix(psnr=f"{psnr:.1f}", kl=f"{kl.item():.2f}", crop=crop, refresh=False)
        if time.time() - last_save > args.ckpt_minutes * 60:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            last_save = time.time()
            log(f"VAE step {step + 1}: psnr {psnr:.1f} dB (checkpoint saved)")
    save_atomic(vae.state_dict(), final)
    return vae


# --------------------------------------------------------------------------------------- latents
@torch.no_grad()
def build_latents(args, out: Path, vae: AutoencoderKL, captions: list[str]) -> dict:
    path = out / "latents.pt"
    if path.exists():
        return torch.load(path)
    rng = np.random.default_rng([args.seed, 2])
    index = {c: i for i, c in enumerate(captions)}
    lat, cap = [], []
    vae.eval()
    for i in tqdm(range(0, args.num_images, 128), desc="latents"):
        scenes = [random_scene(rng) for _ in range(min(128, args.num_images - i))]
        images = np.stack([render(s, rng, SIZE) for s in scenes])
        lat.append(vae.encode(to_pixels(images)).mean.half())
        cap += [index[s.caption] for s in scenes]
    lat = torch.cat(lat)
    stats = {"shift_factor": float(lat.float().mean()), "scaling_factor": float(1 / lat.float().std())}
    data = {"latents": lat, "captions": torch.tensor(cap), **stats}
    save_atomic(data, path)
    log(f"latents {tuple(lat.shape)}; shift {stats['shift_factor']:.4f} scale {stats['scaling_factor']:.4f}")
    return data


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), the FLUX 2x2 packing (PipelineConfig.pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


# ----------------------------------------------------------------------------------- transformer
def train_transformer(args, out: Path, data: dict, text: tuple[torch.Tensor, torch.Tensor]) -> torch.nn.Module:
    final, total = out / "transformer_ema.pt", sum(args.steps)
    torch.manual_seed(args.seed + 3)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    if final.exists():
        state = torch.load(final)
        if state.get("step") == total:
            model.load_state_dict(state["ema"])
            return model
    if args.init:  # fine-tuning: start model and EMA from the earlier run's EMA weights (fresh optimizer)
        model.load_state_dict(torch.load(args.init / "transformer_ema.pt")["ema"])
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), fused=True)
    ckpt, step = out / "transformer_ckpt.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"transformer: resuming at step {step}")
    x0_all = (data["latents"].float() - data["shift_factor"]) * data["scaling_factor"]
    x0_all = pack(x0_all)
    grid = x0_all.new_zeros(8, 8, 3)
    grid[..., 1], grid[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None, :]
    rope = model.rope(grid.reshape(64, 3), torch.zeros(MAX_SEQ, 3))
    embeds, pooled = text
    last_save = time.time()
    bar = tqdm(range(step, total), desc="transformer", initial=step, total=total, mininterval=5)
    avg = None
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(x0_all), (args.batch,), generator=g)
        x0, cap = x0_all[idx], data["captions"][idx]
        if args.cond_dropout > 0:  # the empty caption (last row of the text cache) teaches the unconditional
            drop = torch.rand(args.batch, generator=g) < args.cond_dropout  # model that true CFG samples with
            cap = torch.where(drop, torch.full_like(cap, len(embeds) - 1), cap)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=g))  # logit-normal(0, 1)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = cycle_lr(step, args.steps, args.lr, args.lr * 0.05, 200)
        pred = model(hidden_states=xt, encoder_hidden_states=embeds[cap], pooled_projections=pooled[cap],
                     timestep=sigma, rotary_emb=rope)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if time.time() - last_save > args.ckpt_minutes * 60:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": step + 1}, ckpt)
            last_save = time.time()
            log(f"transformer step {step + 1}: loss {avg:.4f} (checkpoint saved)")
    save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": total}, ckpt)
    save_atomic({"ema": ema.state_dict(), "step": total}, final)
    return ema


# ---------------------------------------------------------------------------------------- export
def _save_module(module: torch.nn.Module, config: dict, class_name: str, folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def export(folder: Path, vae, transformer, latent_stats: dict, text_parts, dtype: torch.dtype) -> None:
    clip_tok, clip, t5_tok, t5 = text_parts
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _save_module(transformer, TRANSFORMER_CONFIG, "FluxTransformer2DModel", folder / "transformer", dtype)
    _save_module(vae, {**VAE_CONFIG, **latent_stats}, "AutoencoderKL", folder / "vae", dtype)
    sched = folder / "scheduler"
    sched.mkdir()
    (sched / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER_CONFIG},
        indent=2) + "\n")
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    clip_tok.save_pretrained(folder / "tokenizer")
    t5_tok.save_pretrained(folder / "tokenizer_2")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION, "_name_or_path": "diffcore/demo",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log(f"exported to {folder} ({size / 1e6:.1f} MB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder (checkpoints, caches, model/)")
    p.add_argument("--export", type=Path, help="also copy the exported model here (e.g. the package's model/)")
    p.add_argument("--init", type=Path, help="fine-tune from this earlier --out folder: reuse its vae.pt and "
                   "start the transformer from its EMA weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=48)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--num-images", type=int, default=16000)
    p.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")], default=[3500, 4000, 2000],
                   help="transformer steps; a comma-separated list restarts the cosine LR per cycle")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--ckpt-minutes", type=float, default=2.0)
    p.add_argument("--cond-dropout", type=float, default=0.0,
                   help="fraction of training captions replaced by the empty caption (for true CFG sampling)")
    p.add_argument("--dtype", default="float16", help="stored weight dtype of transformer and VAE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))

    text_parts = build_text(args.seed)
    captions = all_captions()
    text = encode_text(captions + [""], *text_parts)  # last row: the empty caption (--cond-dropout)
    if args.init and not (args.out / "vae.pt").exists():
        shutil.copy(args.init / "vae.pt", args.out / "vae.pt")
    vae = train_vae(args, args.out)
    data = build_latents(args, args.out, vae, captions)
    transformer = train_transformer(args, args.out, data, text)
    stats = {"shift_factor": data["shift_factor"], "scaling_factor": data["scaling_factor"]}
    export(args.out / "model", vae, transformer, stats, text_parts, getattr(torch, args.dtype))
    if args.export:
        if args.export.exists():
            shutil.rmtree(args.export)
        shutil.copytree(args.out / "model", args.export)
        log(f"copied to {args.export}")


if __name__ == "__main__":
    main()
