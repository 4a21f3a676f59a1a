"""LTX-2 guidance in x0 space, as diffusers' LTX2Pipeline does it, through the core's guidance hooks.

Per stream (video, audio), with x0 = x - sigma * v for each prediction:

    x0 = x0_cond + (g - 1)(x0_cond - x0_uncond)      CFG: the negative prompt (the core's "uncond" branch)
                 + s (x0_cond - x0_stg)               STG: self-attention skipped in the configured blocks
                 + (m - 1)(x0_cond - x0_isolated)     modality isolation: no audio<->video attention
    x0 <- r x0 std(x0_cond) / std(x0) + (1 - r) x0   rescale (r > 0)

and back to a velocity. The core's denoising loop makes the calls: "cond", "uncond" for the rows whose config
wants CFG (g > 1 for video or audio) -- the two as one call on [negative, positive] as diffusers does, through
``merge`` (``LTX2Config.merge_branches``) -- and the extra branches ``LTX2Config.guidance_branches`` names ("stg"
when a row's s > 0 on a transformer that can perturb its attention, "modality" when a row's m > 1), each one
call of ``LTX2Denoiser`` with that branch's kwargs from ``condition``; ``combine`` is the config's
``combine_predictions``. So a step costs 1 to 3 calls, and CFG parallelism shares the branches (4 with every
term on) between two ranks. Scales may differ per row of a batch (a row whose scale is off gets an exact zero
term).
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from diffcore.configs.pipeline_config import broadcast_rows


@attrs.frozen
class Scales:
    """One stream's guidance scales, per row (B,)."""

    cfg: torch.Tensor
    stg: torch.Tensor
    modality: torch.Tensor
    rescale: torch.Tensor

    @classmethod
    def of(cls, req, stream: str) -> "Scales":
        rows = req.row_params if req.row_params is not None else [req.params] * req.batch_size

        def get(name):
            return torch.tensor([p.audio(name) if stream == "audio" else getattr(p, name) for p in rows],
                                dtype=torch.float32)

        return cls(get("guidance_scale"), get("stg_scale"), get("modality_scale"), get("guidance_rescale"))


@attrs.frozen
class Passes:
    """Which extra transformer calls a step makes (the same at every step of a request); CFG's is the core's."""

    stg: bool
    modality: bool

    @classmethod
    def of(cls, video: Scales, audio: Scales, perturbs: bool = True) -> "Passes":
        """``perturbs``: the transformer can skip self-attention (``perturbed_attn``, LTX-2.3). Without it (LTX-2.0)
        diffusers' STG call predicts exactly what the positive call does (its attention ignores the perturbation
        mask), so its term is zero: the call is skipped, not made and subtracted."""
        return cls(perturbs and bool((video.stg > 0).any() or (audio.stg > 0).any()),
                   bool((video.modality > 1).any() or (audio.modality > 1).any()))


def condition(config, components: dict, req) -> dict:
    """The denoiser's kwargs per branch: connector contexts (negative and positive run through the connectors
    together, as diffusers), RoPE tables; "stg" / "modality" are the positive kwargs plus the perturbation, present
    only when some row's scale makes them matter."""
    connectors, transformer = components["connectors"], components["transformer"]
    layout = config.layout(req, components)
    video, audio = Scales.of(req, "video"), Scales.of(req, "audio")
    passes = Passes.of(video, audio, perturbs=bool(transformer.config.get("perturbed_attn", False)))
    embeds, mask = req.prompt_embeds.embeds, req.prompt_embeds.mask
    b = embeds.shape[0]
    if req.do_cfg:
        neg = req.negative_prompt_embeds
        embeds, mask = torch.cat([neg.embeds, embeds]), torch.cat([neg.mask, mask])
    padding_side = getattr(components.get("tokenizer"), "padding_side", "left")
    ctx, audio_ctx, ctx_mask = connectors(embeds.to(connectors.dtype), mask, padding_side=padding_side)
    p = req.params
    rope = transformer.positions.for_request(1, layout.frames, layout.height, layout.width, layout.audio_frames,
                                             p.frame_rate, device=req.device)
    common = dict(layout=layout, rope=rope, fps=p.frame_rate, use_cross_timestep=p.use_cross_timestep,
                  frozen=layout.height * layout.width if req.image_latents is not None else 0)
    cond = dict(common, ctx=ctx[-b:], audio_ctx=audio_ctx[-b:], ctx_mask=ctx_mask[-b:])
    branches = {"cond": cond, "uncond": dict(common, ctx=ctx[:b], audio_ctx=audio_ctx[:b], ctx_mask=ctx_mask[:b])
                if req.do_cfg else None}
    if passes.stg:
        branches["stg"] = dict(cond, spatio_temporal_guidance_blocks=list(p.spatio_temporal_guidance_blocks))
    if passes.modality:
        branches["modality"] = dict(cond, isolate_modalities=True)
    return branches


_TEXT = ("ctx", "audio_ctx", "ctx_mask")  # what differs between the branches of CFG


def merge(branches: list) -> dict:
    """Branch kwargs as one call on their rows stacked in order (``LTX2Config.merge_branches``)."""
    first = branches[0]
    return {k: torch.cat([b[k] for b in branches]) if k in _TEXT else v for k, v in first.items()}


def _sigma(scheduler, t: torch.Tensor) -> torch.Tensor:
    index = scheduler._step_index
    if index is None:
        index = int((scheduler.timesteps.to(t.device) - t.reshape(-1)[0]).abs().argmin())
    return scheduler.sigmas[index]


def rescale(guided: torch.Tensor, cond: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``r * guided * std(cond) / std(guided) + (1 - r) * guided`` per row; rows with r = 0 unchanged."""
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    r = broadcast_rows(r.to(guided.device), guided)
    return torch.where(r > 0, r * guided * ratio + (1 - r) * guided, guided)


# branch -> (the Scales field weighting its term, the value at which the term vanishes)
_TERMS = {"uncond": ("cfg", 1.0), "stg": ("stg", 0.0), "modality": ("modality", 1.0)}


def combine(config, preds: dict, rows: list[int], latents: torch.Tensor, t: torch.Tensor, req) -> torch.Tensor:
    """The guided joint velocity from the branches' joint velocities (``LTX2Config.combine_predictions``)."""
    cond_kwargs = req.condition["cond"]
    layout, frozen = cond_kwargs["layout"], cond_kwargs["frozen"]
    sigma = _sigma(req.scheduler, t.reshape(-1)[0]).to(latents.device)
    cond = preds["cond"].float()
    others = {}
    for name, pred in preds.items():
        if name == "uncond" and len(rows) != req.batch_size:  # rows without CFG: an exact zero term
            full = cond.clone()
            full[torch.tensor(rows, dtype=torch.long, device=cond.device)] = pred.float()
            pred = full
        if name != "cond":
            others[name] = layout.split(pred.float())
    out = []
    for i, (x, v_cond, stream) in enumerate(zip(layout.split(latents), layout.split(cond), ("video", "audio"))):
        scales = Scales.of(req, stream)
        x0_cond = x.float() - v_cond * sigma
        x0 = x0_cond
        for name, split in others.items():  # x0_cond - x0_other = -sigma * (v_cond - v_other)
            field, zero = _TERMS[name]
            scale = broadcast_rows(getattr(scales, field).to(x0.device) - zero, x0)
            x0 = x0 + scale * (-sigma * (v_cond - split[i]))
        x0 = rescale(x0, x0_cond, scales.rescale) if bool((scales.rescale > 0).any()) else x0
        out.append((x.float() - x0) / sigma)
    if frozen:  # image-to-video: the conditioned frame does not move (Euler adds 0 to it)
        out[0][:, :frozen] = 0
    return layout.join(*out)


class LTX2Denoiser(nn.Module):
    """The DenoisingStage's model: joint latent rows and one branch's kwargs in, that branch's joint velocity out.

    ``calls`` counts transformer forwards (the tests check that inactive guidance terms cost nothing). A module
    so that the engine's hooks (call counting, compile) see it; it holds no state of its own per request."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *, layout, ctx, audio_ctx, ctx_mask, rope,
                fps, use_cross_timestep, frozen, **perturbation) -> torch.Tensor:
        self.calls += 1
        model = self.transformer
        video, audio = layout.split(hidden_states)
        t = timestep.reshape(-1)[0]
        n, dtype = video.shape[0], model.dtype
        video_t, audio_t = t.expand(n), None
        if frozen:  # image-to-video: the conditioned frame's tokens sit at t = 0
            video_t = t.expand(n, video.shape[1]).clone()
            video_t[:, :frozen] = 0
            audio_t = t.expand(n)
        v, a = model(hidden_states=video.to(dtype), audio_hidden_states=audio.to(dtype), encoder_hidden_states=ctx,
                     audio_encoder_hidden_states=audio_ctx, timestep=video_t, audio_timestep=audio_t,
                     sigma=t.expand(n), encoder_attention_mask=ctx_mask, audio_encoder_attention_mask=ctx_mask,
                     fps=fps, rotary_emb=rope, use_cross_timestep=use_cross_timestep, **perturbation)
        return layout.join(v.float(), a.float())
