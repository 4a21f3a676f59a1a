"""Static, per-model configuration plus the hooks the generic stages call.

A stage never knows which model it serves: where models differ (how a prompt is encoded, how
latents are packed, what the transformer needs besides latents and timestep) the stage calls a
hook of the model's PipelineConfig. One subclass per model family (or checkpoint variant).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Optional

import attrs
import torch

from ..errors import ConfigError, SamplingParamError
from ..notices import notice
from ..outputs import DEFAULT_FPS
from .engine_args import parse_dtype
from .fewstep import CausalConfig, DmdConfig

if TYPE_CHECKING:
    from ..request import PromptEmbeds, Request

log = logging.getLogger(__name__)


@attrs.define(kw_only=True)
class PipelineConfig:
    # Precision per component name (model_index key); others use default_dtype.
    default_dtype: str = "bfloat16"
    component_dtypes: dict = attrs.field(factory=dict)
    # Latent geometry: VAE spatial/temporal compression and the transformer's patch packing.
    vae_scale_factor: int = 8
    vae_temporal_factor: int = 1
    latent_patch: int = 2
    # Flow-matching schedule: pass sigmas=linspace(1, 1/N, N) and mu from the image sequence length.
    linear_sigmas: bool = True
    # Classifier-free guidance policy: "none" (guidance-distilled or off), "cfg", "true_cfg".
    cfg: str = "none"
    default_negative_prompt: Optional[str] = None
    is_video: bool = False
    # How a size the model cannot take is handled: "round" (down, with a warning) or "error".
    size_policy: str = "round"

    # Components the pipeline uses but a checkpoint may omit ([null, null] in model_index.json).
    optional_components: ClassVar[tuple[str, ...]] = ()
    # The model's transformer(s) shard their token sequence under sequence parallelism (sp_degree > 1):
    # they call diffcore.parallel.sequence_shard and pass the shard to the attention dispatch.
    sequence_parallel: ClassVar[bool] = False
    # The pipeline writes a sound track beside its frames: some stage must produce ``audio`` and
    # ``audio_sample_rate`` (the dataflow proof checks), and results, mp4s and the server carry it.
    has_audio: ClassVar[bool] = False
    # Its pictures carry an alpha channel (Qwen-Image-Layered): the server honours background="transparent".
    has_alpha: ClassVar[bool] = False
    # Rows with and without CFG may share a batch (the engine leaves do_cfg out of the batch key): the config's
    # wants_cfg alone decides per row whether CFG runs (no other condition, such as true CFG's negative prompt).
    mixed_cfg_batches: ClassVar[bool] = False
    # Whether ``decode`` of a step's predicted clean latents makes a preview of the final picture (diffcore.previews);
    # False where one picture is not what decode makes of the latents (layers, audio + video tokens).
    previews: ClassVar[bool] = True
    # Rows at different steps may share a transformer call (diffcore.engine.stepping): the hooks take one
    # timestep per row (``model_timestep`` gets a (B,) ``t``) and the conditioning stages can run again over
    # rows merged mid-run. False: this family's requests run in start-only batches.
    step_rows: ClassVar[bool] = True
    # The denoiser components (what quantization and layer offload apply to).
    denoiser_components: ClassVar[tuple[str, ...]] = ("transformer",)

    default_fps: int = DEFAULT_FPS  # frames per second of the model's videos (a request's ``fps`` overrides it)
    # Few-step distilled checkpoints (DmdDenoisingStage) and block-causal ones (CausalDMDDenoisingStage).
    dmd: Optional[DmdConfig] = None
    causal: Optional[CausalConfig] = None

    def custom_loaders(self) -> dict:
        """Component loaders that replace the generic one, keyed by component or class name."""
        return {}

    # ---- precision ---------------------------------------------------------------------------
    def dtype_for(self, component: str, override: Optional[torch.dtype] = None) -> torch.dtype:
        if override is not None:
            return override
        return parse_dtype(self.component_dtypes.get(component, self.default_dtype))

    def configure_from_index(self, model_index) -> None:
        """Read per-checkpoint switches from model_index.json's pipeline-level extras (none here)."""

    def configure_from_components(self, components: dict) -> None:
        """Derive the latent geometry from the loaded VAE (its ``spatial_compression_ratio`` and
        ``temporal_compression_ratio``, diffusers' attribute names), as diffusers' pipelines do."""
        vae = components.get("vae")
        spatial = getattr(vae, "spatial_compression_ratio", None)
        if spatial is None and (getattr(vae, "config", None) or {}).get("block_out_channels"):
            spatial = 2 ** (len(vae.config["block_out_channels"]) - 1)  # a 2-D VAE from another library
        if spatial:
            self.vae_scale_factor = int(spatial)
        temporal = getattr(vae, "temporal_compression_ratio", None)
        if temporal:
            self.vae_temporal_factor = int(temporal)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_patch

    def round_size(self, name: str, value: int) -> int:
        """Round ``value`` down to what the model takes, warning (or refusing, per size_policy)."""
        m = self.size_multiple
        if value % m == 0:
            return value
        rounded = max(m, value // m * m)
        if self.size_policy == "error":
            raise SamplingParamError(name, f"{name}={value} is not a multiple of {m}; use e.g. {rounded}")
        notice(log, "%s=%d is not a multiple of %d; using %d (as diffusers does)", name, value, m, rounded)
        return rounded

    def resolve_size(self, req: "Request", components: dict) -> None:
        """Set req.height / req.width (and num_frames for video) from params and model defaults. The input
        images are already decoded (``req.images``, RGB PIL): size from them, never decode them again."""
        p = req.params
        req.height = self.round_size("height", p.height or self.default_size(components)[0])
        req.width = self.round_size("width", p.width or self.default_size(components)[1])

    def default_size(self, components: dict) -> tuple[int, int]:
        return 1024, 1024

    # ---- text ------------------------------------------------------------------------------
    def encode_prompts(self, components: dict, prompts: list[str], req: "Request") -> "PromptEmbeds":
        raise NotImplementedError(f"{type(self).__name__} must implement encode_prompts")

    def encode_image(self, components: dict, req: "Request") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_image")

    # ---- latents ---------------------------------------------------------------------------
    def latent_shape(self, req: "Request", components: dict) -> tuple[int, ...]:
        """Shape of the initial noise, in the exact layout diffusers draws it (seed parity)."""
        c = components["transformer"].config["in_channels"] // (self.latent_patch**2)
        h, w = req.height // self.vae_scale_factor, req.width // self.vae_scale_factor
        return (req.batch_size, c, h, w)

    def latent_dtype(self, components: dict) -> torch.dtype:
        """dtype of the initial noise and of the latents the scheduler steps: the transformer's, as in
        diffusers' FLUX/Qwen pipelines (Wan overrides it: float32, cast per step in ``model_input``)."""
        return components["transformer"].dtype

    def pack_latents(self, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, C*p*p) tokens; identity when latent_patch is 1."""
        p = self.latent_patch
        if p == 1:
            return latents
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // p) * (w // p), c * p * p)

    def unpack_latents(self, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        p = self.latent_patch
        if p == 1:
            return latents
        b, _, d = latents.shape
        h, w = req.height // self.vae_scale_factor, req.width // self.vae_scale_factor
        latents = latents.view(b, h // p, w // p, d // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, d // (p * p), h, w)

    def image_seq_len(self, req: "Request") -> int:
        return req.latents.shape[1]

    def schedule_mu(self, scheduler, req: "Request") -> float:
        """The dynamic-shift ``mu`` of a scheduler with ``use_dynamic_shifting``: by default the scheduler's
        own rule over ``image_seq_len`` (base/max shift); a model with another rule (FLUX.2's empirical mu,
        which also depends on the step count) overrides this."""
        return scheduler.compute_mu(self.image_seq_len(req))

    # ---- condition images ------------------------------------------------------------------
    def encode_condition_images(self, components: dict, req: "Request") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement encode_condition_images")

    def encode_init_image(self, components: dict, pixels: torch.Tensor, req: "Request") -> torch.Tensor:
        """Image-to-image: pixels (1, 3, H, W) in [-1, 1] -> normalised latents in the VAE's layout, a sample of
        the posterior drawn from the request's generator (diffusers' ``retrieve_latents``, sample mode)."""
        from ..models.latent_norm import normalize

        vae = components["vae"]
        dist = vae.encode(self.vae_pixels(pixels, vae).to(vae.device, vae.dtype))
        noise = torch.randn(dist.mean.shape, generator=req.generator, dtype=dist.mean.dtype, device="cpu")
        return normalize(dist.mean + dist.std * noise.to(dist.mean.device), vae)

    def vae_pixels(self, pixels: torch.Tensor, vae) -> torch.Tensor:
        """Pixels (B, 3, H, W) in the layout the VAE encodes (a video VAE: one frame, (B, 3, 1, H, W))."""
        return pixels.unsqueeze(2) if getattr(vae, "temporal_compression_ratio", None) else pixels

    # ---- denoising -------------------------------------------------------------------------
    def prepare_condition(self, components: dict, req: "Request") -> dict:
        """Per-request constants for the transformer: {"cond": kwargs, "uncond": kwargs or None}."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare_condition")

    def model_input(self, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        return latents

    def model_timestep(self, t: torch.Tensor, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        """The transformer's timestep input; flow models in diffusers' FLUX/Qwen convention take t/1000."""
        return t.expand(latents.shape[0]).to(latents.dtype) / 1000

    def model_output(self, noise_pred: torch.Tensor, req: "Request") -> torch.Tensor:
        return noise_pred

    def select_denoiser(self, t: torch.Tensor, req: "Request", num_denoisers: int) -> int:
        """Which of the denoising stage's models serves timestep ``t`` (a multi-expert model overrides this)."""
        return 0

    def wants_cfg(self, params) -> bool:
        """Whether a request runs the unconditional branch at all: ``guidance_scale > 1`` ("cfg"),
        ``true_cfg_scale > 1`` ("true_cfg", which also needs a negative prompt). Z-Image: ``guidance_scale > 0``."""
        if self.cfg == "cfg":
            return params.guidance_scale > 1.0
        if self.cfg == "true_cfg":
            return params.true_cfg_scale > 1.0
        return False

    def guidance_active(self, params, step: int, t: torch.Tensor) -> bool:
        """The per-step guidance policy: whether a row with these sampling parameters runs the unconditional
        branch at ``step`` (timestep ``t``), asked only when its request runs CFG. Every step by default;
        Z-Image stops after ``cfg_truncation``, a "CFG only in the first k steps" policy returns ``step < k``."""
        return True

    def condition_rows(self, kwargs: dict, rows: list[int], req: "Request") -> Optional[dict]:
        """``prepare_condition``'s kwargs of one branch narrowed to ``rows``, so the unconditional call runs
        only for the rows that still need it; None (the default) runs it for the whole batch instead."""
        return None

    def guidance_scale_at(self, t: torch.Tensor, req: "Request", expert: int):
        """The CFG scale for this step and denoiser: a float, or one per row (``row_scale``) in a batch."""
        return row_scale(req.per_row("true_cfg_scale" if self.cfg == "true_cfg" else "guidance_scale"))

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale, req: "Request") -> torch.Tensor:
        """``uncond + scale * (cond - uncond)``; ``scale`` is a float or a per-row tensor (B,)."""
        scale = broadcast_rows(scale, cond)
        return uncond + scale * (cond - uncond)

    def guidance_branches(self, req: "Request", step: int, t: torch.Tensor) -> tuple[str, ...]:
        """Names of the extra predictions a step makes beside the conditional and unconditional ones, for
        guidance that needs more than CFG (LTX-2: a call with perturbed self-attention, one with the audio/video
        cross-attention off). Each is one model call on the whole batch with ``req.condition[name]``'s kwargs;
        ``combine_predictions`` combines them. None by default."""
        return ()

    def merge_branches(self, branches: list, req: "Request") -> Optional[dict]:
        """The kwargs of several branches (``[uncond, cond]``) as one model call on the latents stacked branch by
        branch, or None (the default: one call per branch). A config that merges sees that call through its
        ``model_input`` / ``model_timestep`` / ``model_output`` with twice the rows of ``req``. Used for CFG when
        every row is guided, no step cache runs and no CFG parallelism splits the branches (LTX-2: diffusers'
        batched [negative, positive] call, faster on small batches than two calls)."""
        return None

    def combine_predictions(self, preds: dict, rows: list[int], latents: torch.Tensor, t: torch.Tensor,
                            req: "Request", expert: int) -> torch.Tensor:
        """A step's predictions by branch -> the one the scheduler steps with. ``preds["cond"]`` holds every row;
        ``preds["uncond"]`` (present when CFG runs this step) only ``rows``; each ``guidance_branches`` entry every
        row. Default: CFG of the two branches per row (``combine_guidance``); a config guiding in another space
        (x0), with more terms or a rescale overrides this."""
        if "uncond" not in preds:
            return preds["cond"]
        from ..stages.guidance import combine_rows

        return combine_rows(self, preds["cond"], preds["uncond"], rows, t, req, expert)

    def hook_inputs(self) -> dict:
        """``{stage class: (In(...), ...)}``: Request fields this config's hooks read inside stages of that class
        (or a subclass, whatever the pipeline names them) beyond the stage's own inputs. The pipeline adds
        them to the stage's contract, so the dataflow proof and the run-time checks cover them; keyed by
        class, so renaming a stage cannot drop them."""
        return {}

    # ---- batching --------------------------------------------------------------------------
    def batch_key(self, req: "Request") -> tuple:
        """What, beyond the engine's generic key (sizes, steps, CFG, ...), must be equal for two
        requests to share transformer calls (e.g. the geometry of condition images). Hashable."""
        return ()

    # ---- decoding --------------------------------------------------------------------------
    def decode(self, components: dict, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        """Latents -> pixels in [0, 1], channels last: (B, H, W, C) or (B, F, H, W, C) for video."""
        from ..models.latent_norm import denormalize

        vae = components["vae"]
        z = denormalize(self.unpack_latents(latents, req), vae)
        return self.to_pixels(vae.decode(z.to(vae.dtype)))

    def latent_output(self, components: dict, latents: torch.Tensor, req: "Request") -> torch.Tensor:
        """What ``output_type="latent"`` returns: by default the loop's latents as they are (diffusers' choice
        for most pipelines); a model whose diffusers pipeline returns them unpacked / de-normalised overrides it."""
        return latents

    def to_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1], channels first -> [0, 1] float32, channels last."""
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
        if pixels.ndim == 5:
            pixels = pixels.permute(0, 2, 3, 4, 1)
            return pixels if self.is_video else pixels[:, 0]
        return pixels.permute(0, 2, 3, 1)

    def stream_decoder(self, components: dict, req: "Request"):
        """``decode(latents_block, last) -> pixels (B, F, H, W, C)`` for consecutive blocks of latent frames
        (block-causal video): the VAE must be causal in time and offer ``stream_decoder()``."""
        from ..models.latent_norm import denormalize

        vae = components["vae"]
        if not hasattr(vae, "stream_decoder"):
            raise ConfigError(f"{type(vae).__name__} cannot decode a video block by block (no stream_decoder)")
        stream = vae.stream_decoder()

        def decode(latents: torch.Tensor, last: bool = False) -> torch.Tensor:
            z = denormalize(self.unpack_latents(latents, req), vae)
            return self.to_pixels(stream.decode(z.to(vae.dtype), last=last))

        return decode


def row_scale(values: list):
    """One float when every row has the same value (a single request), else a float32 tensor (B,)."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=torch.float32)


def broadcast_rows(scale, like: torch.Tensor):
    """A per-row tensor ``scale`` (B,) shaped (B, 1, ..., 1) to broadcast against ``like``; floats as they are."""
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return scale
