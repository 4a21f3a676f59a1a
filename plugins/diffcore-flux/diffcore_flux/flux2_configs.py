"""FLUX.2 configs: [dev] (Mistral, embedded guidance), [klein] distilled / base (Qwen3, CFG vs the empty
prompt) and klein-KV (reference K/V computed once per request).

Numerics follow diffusers' ``pipeline_flux2.py``, ``pipeline_flux2_klein.py`` and
``pipeline_flux2_klein_kv.py``: noise is drawn as (B, 128, H/16, W/16) (already 2x2-patchified) and
packed row-major; position ids have four axes (t, h, w, l): text (0, 0, 0, l), target (0, h, w, 0),
reference image i (10 + 10 i, h, w, 0); the schedule is ``linspace(1, 1/N, N)`` shifted by BFL's
empirical ``mu`` (token count and step count); reference images are VAE-encoded (posterior mode),
patchified and normalised by the VAE's batch-norm statistics, then appended to the target tokens.
"""
from __future__ import annotations

import logging
import math
from typing import ClassVar, Optional

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.errors import SamplingParamError
from diffcore.notices import notice
from diffcore.request import PromptEmbeds

from .flux2_text import MISTRAL_LAYERS, QWEN3_LAYERS, load_pixtral_tokenizer, mistral_inputs, qwen3_inputs, \
    stacked_hidden_states

log = logging.getLogger(__name__)

REF_MAX_AREA = 1024 * 1024  # references above this many pixels are downscaled to it (LANCZOS)
REF_MIN_SIDE = 64
REF_MAX_ASPECT = 8


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's schedule shift: linear in the token count, interpolated in the step count between 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def is_klein_distilled(model_index, folder) -> bool:
    return bool(getattr(model_index, "extra", {}).get("is_distilled"))


def reference_size(image, multiple: int = 16) -> tuple[int, int]:
    """(height, width) a reference is encoded at: area capped at 1024^2 (aspect kept), floored to ``multiple``."""
    w, h = image.size
    if w * h > REF_MAX_AREA:
        scale = math.sqrt(REF_MAX_AREA / (w * h))
        w, h = int(w * scale), int(h * scale)
    return h // multiple * multiple, w // multiple * multiple


def check_reference(image, index: int) -> None:
    w, h = image.size
    if w < REF_MIN_SIDE or h < REF_MIN_SIDE:
        raise SamplingParamError("image", f"image[{index}] is {w}x{h}: FLUX.2 reference images need both sides "
                                 f">= {REF_MIN_SIDE} px; upscale it")
    if max(w / h, h / w) > REF_MAX_ASPECT:
        raise SamplingParamError("image", f"image[{index}] is {w}x{h}: aspect ratio above {REF_MAX_ASPECT}:1; crop it")


def prepare_reference(image):
    """The reference as diffusers feeds the VAE: downscaled to <= 1024^2 if larger, centre-cropped to multiples of 16."""
    from diffcore.image_processing import resize

    w, h = image.size
    if w * h > REF_MAX_AREA:
        scale = math.sqrt(REF_MAX_AREA / (w * h))
        image = resize(image, int(h * scale), int(w * scale))
    th, tw = reference_size(image)
    left, top = (image.size[0] - tw) // 2, (image.size[1] - th) // 2
    return image.crop((left, top, left + tw, top + th))


def position_ids(h: int, w: int, t: int = 0, device=None):
    """(h*w, 4) ids (t, row, col, 0) of a packed latent grid, row-major."""
    import torch

    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 4)


@attrs.define(kw_only=True)
class Flux2DevConfig(PipelineConfig):
    """FLUX.2 [dev]: Mistral prompt features, embedded guidance, 0-10 reference images."""

    sequence_parallel: ClassVar[bool] = True  # the transformer shards its image tokens (Ulysses)
    default_dtype: str = "bfloat16"
    text_layers: tuple = MISTRAL_LAYERS
    kv_references: ClassVar[bool] = False  # klein-KV: references run once, as cached K/V

    def custom_loaders(self) -> dict:
        return {"PixtralProcessor": load_pixtral_tokenizer}

    # ---- sizes and references ---------------------------------------------------------------
    def resolve_size(self, req, components) -> None:
        """Check the references; without an explicit size use the first reference's encoded size, else 1024^2."""
        p = req.params
        height, width = p.height, p.width
        refs = req.images or []  # the references as the validation stage decoded them
        for i, im in enumerate(refs):
            check_reference(im, i)
        if refs:
            h, w = reference_size(refs[0], self.size_multiple)
            height, width = height or h, width or w
        req.height = self.round_size("height", height or 1024)
        req.width = self.round_size("width", width or 1024)
        self.check_guidance(p)

    def check_guidance(self, params) -> None:
        """[dev] embeds guidance_scale; nothing to warn about."""

    def reference_grids(self, req) -> list[tuple[int, int]]:
        """(h, w) token grid of every reference image, in order."""
        m = self.size_multiple
        return [(h // m, w // m) for h, w in (reference_size(im, m) for im in (req.images or []))]

    def batch_key(self, req) -> tuple:
        """Rows share transformer calls only with the same reference token grids (their position ids)."""
        return tuple(self.reference_grids(req))

    def hook_inputs(self) -> dict:
        """``prepare_condition`` reads the references and their latents; ``model_input`` appends the latents."""
        import torch

        from diffcore.stages import ConditioningStage, DenoisingLoopStage, In

        return {ConditioningStage: (In("images", list, required=False), In("image_latents", torch.Tensor, required=False)),
                DenoisingLoopStage: (In("image_latents", torch.Tensor, required=False),)}

    # ---- text ------------------------------------------------------------------------------
    def text_inputs(self, components, prompts, req) -> dict:
        return mistral_inputs(components["tokenizer"], prompts, req.params.max_sequence_length)

    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        import torch

        encoder = components["text_encoder"]
        with torch.inference_mode():
            embeds = stacked_hidden_states(encoder, self.text_inputs(components, prompts, req), self.text_layers)
        return PromptEmbeds(embeds=embeds.to(req.device))

    # ---- latents: (B, 128, H/16, W/16) noise, packed row-major -----------------------------------
    def latent_shape(self, req, components) -> tuple[int, ...]:
        m = self.size_multiple
        return req.batch_size, components["transformer"].config["in_channels"], req.height // m, req.width // m

    def pack_latents(self, latents, req):
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack_latents(self, latents, req):
        m = self.size_multiple
        b, _, c = latents.shape
        return latents.permute(0, 2, 1).reshape(b, c, req.height // m, req.width // m)

    def image_seq_len(self, req) -> int:
        return (req.height // self.size_multiple) * (req.width // self.size_multiple)

    def schedule_mu(self, scheduler, req) -> float:
        return compute_empirical_mu(self.image_seq_len(req), req.params.num_inference_steps)

    # ---- references ----------------------------------------------------------------------------
    def encode_condition_images(self, components, req):
        """Each reference VAE-encoded (mode), patchified, normalised, packed; concatenated in order."""
        import torch

        from diffcore.image_processing import to_tensor

        vae = components["vae"]
        tokens = []
        with torch.inference_mode():
            for im in req.images:
                pixels = to_tensor([prepare_reference(im)]).to(req.device, vae.dtype)
                z = vae.normalize(vae.encode(pixels).mode())
                del pixels
                tokens.append(self.pack_latents(z, req))
            out = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        return out.expand(req.batch_size, -1, -1).to(components["transformer"].dtype)

    def image_ids(self, req):
        """Target ids, then each reference's at t = 10, 20, ..."""
        import torch

        m = self.size_multiple
        ids = [position_ids(req.height // m, req.width // m, device=req.device)]
        ids += [position_ids(h, w, 10 + 10 * i, req.device) for i, (h, w) in enumerate(self.reference_grids(req))]
        return torch.cat(ids)

    # ---- denoising -------------------------------------------------------------------------
    def guidance(self, components, req):
        import torch

        if not components["transformer"].config.get("guidance_embeds"):
            return None
        return torch.tensor(req.per_row("guidance_scale"), dtype=torch.float32, device=req.device)

    def prepare_condition(self, components, req) -> dict:
        import torch

        model = components["transformer"]
        n_txt = req.prompt_embeds.embeds.shape[1]
        txt_ids = torch.zeros(n_txt, 4, device=req.device)
        txt_ids[:, 3] = torch.arange(n_txt, device=req.device)
        img_ids = self.image_ids(req)
        guidance = self.guidance(components, req)
        extra = {}
        if self.kv_references and req.images:
            from .flux2_transformer import RefKV

            n_target = self.image_seq_len(req)
            target_rope = model.rope(img_ids[:n_target], txt_ids)
            ref_ids = torch.cat([img_ids[n_target:], img_ids[:n_target]])  # extract call: [text, refs, target]
            extra["ref_kv"] = RefKV(req.image_latents, model.rope(ref_ids, txt_ids))
            rope = target_rope
        else:
            rope = model.rope(img_ids, txt_ids)

        def kwargs(p):
            return dict(encoder_hidden_states=p.embeds.to(model.dtype), guidance=guidance, rotary_emb=rope, **extra)

        neg = req.negative_prompt_embeds
        return {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(neg) if neg is not None else None}

    def model_input(self, latents, req):
        import torch

        if req.image_latents is None or self.kv_references:
            return latents
        return torch.cat([latents, req.image_latents.to(latents.dtype)], dim=1)

    def model_output(self, noise_pred, req):
        return noise_pred[:, : req.latents.shape[1]]

    # ---- decoding --------------------------------------------------------------------------
    def decode(self, components, latents, req):
        vae = components["vae"]
        z = vae.denormalize(self.unpack_latents(latents, req))
        return self.to_pixels(vae.decode(z.to(vae.dtype)))


@attrs.define(kw_only=True)
class Flux2KleinConfig(Flux2DevConfig):
    """FLUX.2 [klein] 4B / 9B. Distilled (``is_distilled`` in model_index.json): one pass, guidance ignored.
    Base: CFG against the empty prompt when guidance_scale > 1."""

    text_layers: tuple = QWEN3_LAYERS
    cfg: str = "cfg"
    default_negative_prompt: Optional[str] = ""
    is_distilled: bool = False

    def custom_loaders(self) -> dict:
        return {}

    def configure_from_index(self, model_index) -> None:
        self.is_distilled = bool(getattr(model_index, "extra", {}).get("is_distilled", self.is_distilled))
        self.cfg = "none" if self.is_distilled else "cfg"

    def check_guidance(self, params) -> None:
        if self.is_distilled and params.guidance_scale > 1.0:
            notice(log, "guidance_scale=%s is ignored: this FLUX.2 [klein] checkpoint is step-distilled (no CFG)",
                   params.guidance_scale, ignored="guidance_scale")

    def text_inputs(self, components, prompts, req) -> dict:
        return qwen3_inputs(components["tokenizer"], prompts, req.params.max_sequence_length)

    def guidance(self, components, req):
        return None  # klein has no guidance embedding; base models run real CFG

    def latent_output(self, components, latents, req):
        """diffusers' klein pipelines return de-normalised, unpatchified (B, 32, H/8, W/8) VAE latents for
        ``output_type="latent"`` ([dev]'s returns the packed, normalised tokens: the default)."""
        return components["vae"].denormalize(self.unpack_latents(latents, req))


@attrs.define(kw_only=True)
class Flux2KleinKVConfig(Flux2KleinConfig):
    """FLUX.2 [klein] 9B-KV: distilled; reference tokens run once (first step) and are reused as cached K/V."""

    sequence_parallel: ClassVar[bool] = False  # the cached reference K/V are not sharded
    kv_references: ClassVar[bool] = True
    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    is_distilled: bool = True

    def configure_from_index(self, model_index) -> None:
        self.is_distilled, self.cfg = True, "none"


@attrs.define(kw_only=True)
class Flux2DevSamplingParams(SamplingParams):
    """FLUX.2 [dev]: 50 steps, embedded guidance 4.0 (diffusers' and BFL's defaults), 0-10 references."""

    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    max_sequence_length: int = 512
    max_sequence_length_limit: ClassVar[int] = 512
    max_images: ClassVar[int] = 10


@attrs.define(kw_only=True)
class Flux2KleinSamplingParams(Flux2DevSamplingParams):
    """[klein] distilled / KV: 4 steps, no guidance (the BFL recipe)."""

    num_inference_steps: int = 4
    guidance_scale: float = 1.0


@attrs.define(kw_only=True)
class Flux2KleinBaseSamplingParams(Flux2DevSamplingParams):
    """[klein] base: 50 steps, CFG 4.0 against the empty prompt."""
