"""LTX-2 guidance in x0 space, as diffusers' LTX2Pipeline does it, inside one denoiser call per step.

Per stream (video, audio), with x0 = x - sigma * v for each prediction:

    x0 = x0_cond + (g - 1)(x0_cond - x0_uncond)      CFG: one batch of [negative, positive] prompts
                 + s (x0_cond - x0_stg)               STG: self-attention skipped in the configured blocks
                 + (m - 1)(x0_cond - x0_isolated)     modality isolation: no audio<->video attention
    x0 <- r x0 std(x0_cond) / std(x0) + (1 - r) x0   rescale (r > 0)

and back to a velocity. Each extra transformer call runs only when some row's scale makes it matter
(CFG: g > 1 for video or audio; STG: s > 0 on a transformer that can perturb its attention; isolation:
m > 1), so a step costs 1 to 3 calls. Scales may differ
per row of a batch (a row whose scale is off gets an exact zero term).
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
    """Which transformer calls a step makes (the same at every step of a request)."""

    cfg: bool
    stg: bool
    modality: bool

    @classmethod
    def of(cls, video: Scales, audio: Scales, perturbs: bool = True) -> "Passes":
        """``perturbs``: the transformer can skip self-attention (``perturbed_attn``, LTX-2.3). Without it (LTX-2.0)
        diffusers' STG call predicts exactly what the positive call does (its attention ignores the perturbation
        mask), so its term is zero: the call is skipped, not made and subtracted."""
        return cls(bool((video.cfg > 1).any() or (audio.cfg > 1).any()),
                   perturbs and bool((video.stg > 0).any() or (audio.stg > 0).any()),
                   bool((video.modality > 1).any() or (audio.modality > 1).any()))


def condition(config, components: dict, req) -> dict:
    """The denoiser's per-request constants: connector contexts ([negative, positive] with CFG), RoPE tables,
    scales, which passes run, and the request's scheduler (its sigma converts velocities to x0)."""
    connectors, transformer = components["connectors"], components["transformer"]
    layout = config.layout(req, components)
    video, audio = Scales.of(req, "video"), Scales.of(req, "audio")
    passes = Passes.of(video, audio, perturbs=bool(transformer.config.get("perturbed_attn", False)))
    embeds, mask = req.prompt_embeds.embeds, req.prompt_embeds.mask
    if passes.cfg:
        neg = req.negative_prompt_embeds
        embeds, mask = torch.cat([neg.embeds, embeds]), torch.cat([neg.mask, mask])
    padding_side = getattr(components.get("tokenizer"), "padding_side", "left")
    ctx, audio_ctx, ctx_mask = connectors(embeds.to(connectors.dtype), mask, padding_side=padding_side)
    p = req.params
    rope = transformer.positions.for_request(1, layout.frames, layout.height, layout.width, layout.audio_frames,
                                             p.frame_rate, device=req.device)
    kwargs = dict(layout=layout, ctx=ctx, audio_ctx=audio_ctx, ctx_mask=ctx_mask, rope=rope, video_scales=video,
                  audio_scales=audio, passes=passes, scheduler=req.scheduler, fps=p.frame_rate,
                  stg_blocks=list(p.spatio_temporal_guidance_blocks), use_cross_timestep=p.use_cross_timestep,
                  frozen=layout.height * layout.width if req.image_latents is not None else 0)
    return {"cond": kwargs, "uncond": None}


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


class LTX2Denoiser(nn.Module):
    """The DenoisingStage's model: joint latent rows in, the guided joint velocity out.

    ``calls`` counts transformer forwards (the tests check that inactive guidance terms cost nothing). A module
    so that the engine's hooks (call counting, compile) see it; it holds no state of its own per request."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.calls = 0

    def _run(self, video, audio, t, ctx, audio_ctx, mask, kw, **extra):
        self.calls += 1
        model = self.transformer
        dtype = model.dtype
        n = video.shape[0]
        timestep, audio_timestep = t.expand(n), None
        if kw["frozen"]:  # image-to-video: the conditioned frame's tokens sit at t = 0
            timestep = t.expand(n, video.shape[1]).clone()
            timestep[:, :kw["frozen"]] = 0
            audio_timestep = t.expand(n)
        v, a = model(hidden_states=video.to(dtype), audio_hidden_states=audio.to(dtype), encoder_hidden_states=ctx,
                     audio_encoder_hidden_states=audio_ctx, timestep=timestep, audio_timestep=audio_timestep,
                     sigma=t.expand(n), encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                     fps=kw["fps"], rotary_emb=kw["rope"], use_cross_timestep=kw["use_cross_timestep"], **extra)
        return v.float(), a.float()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kw) -> torch.Tensor:
        layout, passes = kw["layout"], kw["passes"]
        video, audio = layout.split(hidden_states)
        t = timestep.reshape(-1)[0]
        sigma = _sigma(kw["scheduler"], t).to(video.device)
        b = video.shape[0]
        ctx, audio_ctx, mask = kw["ctx"], kw["audio_ctx"], kw["ctx_mask"]
        deltas = []  # (term video, term audio, scales attribute)
        if passes.cfg:  # one call on [negative, positive], as diffusers
            v, a = self._run(torch.cat([video, video]), torch.cat([audio, audio]), t, ctx, audio_ctx, mask, kw)
            (vu, vc), (au, ac) = v.chunk(2), a.chunk(2)
            ctx, audio_ctx, mask = ctx[b:], audio_ctx[b:], mask[b:]
            deltas.append((vc - vu, ac - au, "cfg", 1.0))
        else:
            vc, ac = self._run(video, audio, t, ctx, audio_ctx, mask, kw)
        if passes.stg:
            vs, as_ = self._run(video, audio, t, ctx, audio_ctx, mask, kw, spatio_temporal_guidance_blocks=kw["stg_blocks"])
            deltas.append((vc - vs, ac - as_, "stg", 0.0))
        if passes.modality:
            vm, am = self._run(video, audio, t, ctx, audio_ctx, mask, kw, isolate_modalities=True)
            deltas.append((vc - vm, ac - am, "modality", 1.0))
        out = []
        for x, v_cond, scales, i in ((video, vc, kw["video_scales"], 0), (audio, ac, kw["audio_scales"], 1)):
            x0_cond = x.float() - v_cond * sigma
            x0 = x0_cond
            for delta in deltas:  # x0_cond - x0_other = -sigma * (v_cond - v_other)
                scale = broadcast_rows(getattr(scales, delta[2]).to(x0.device) - delta[3], x0)
                x0 = x0 + scale * (-sigma * delta[i])
            x0 = rescale(x0, x0_cond, scales.rescale) if bool((scales.rescale > 0).any()) else x0
            out.append((x.float() - x0) / sigma)
        if kw["frozen"]:  # the conditioned frame does not move: Euler adds 0 to it
            out[0][:, :kw["frozen"]] = 0
        return layout.join(*out)
