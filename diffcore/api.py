"""The public Python API: ``DiffGenerator.from_pretrained(model).generate(prompt=...)``."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from .configs.engine_args import EngineArgs
from .errors import SamplingParamError
from .loader import pretrained as steps
from .outputs import GenerationResult
from .plugins import PluginManager, get_plugin_manager
from . import ignored
from .notices import notice
from .engine import intake
from .request import Request

log = logging.getLogger(__name__)



class DiffGenerator:
    """A loaded pipeline, ready to generate. Build it with ``from_pretrained``. It is a
    ``diffcore.protocols.ServedModel``: what ``diffcore serve`` serves."""

    broken: Optional[str] = None  # (diffcore.protocols.ServedModel) one process never falls out of step
    stops_at_steps = True  # (ServedModel) a cancelled request stops at its next denoising step

    def __init__(self, pipeline, sampling_params_cls, model: str, folder: Path, load_time: float, registry=None):
        self.pipeline, self.sampling_params_cls = pipeline, sampling_params_cls
        self.model, self.folder, self.load_time = model, folder, load_time
        self.registry = registry  # where the plugins' LoRA formats come from (default: the process-wide one)

    @property
    def config(self):
        return self.pipeline.config

    @property
    def components(self) -> dict:
        return self.pipeline.components

    @property
    def streams_blocks(self) -> bool:
        """Whether ``generate`` hands out finished blocks of video frames (``block_callback``)."""
        from .stages.causal import CausalDMDDenoisingStage

        return any(isinstance(s, CausalDMDDenoisingStage) and s.components is not None for s in self.pipeline.stages)

    @property
    def can_preview(self) -> bool:
        """Whether ``generate(on_preview=...)`` can show what a request is becoming (diffcore.previews): the
        denoising loop hands out each step's predicted clean latents and the model decodes them to one picture."""
        from .stages.loop import DenoisingLoopStage

        return self.config.previews and any(isinstance(s, DenoisingLoopStage) and s.hands_out_x0
                                            for s in self.pipeline.stages)

    def attach_previews(self, req: Request, on_preview, partial_images=None) -> Request:
        """Have ``req`` call ``on_preview(Preview)`` at ``partial_images`` of its denoising steps, spread evenly
        (default 3 with ``on_preview``); SamplingParamError names a bad value or a model that cannot preview."""
        from . import previews

        count = self._preview_count(on_preview, partial_images)
        req.x0_callback = previews.x0_callback(self.config, self.components, req, on_preview, count)
        return req

    def _preview_count(self, on_preview, partial_images) -> int:
        from . import previews

        count = previews.check(on_preview, partial_images)
        if count and not self.can_preview:
            raise SamplingParamError("on_preview", f"{type(self.pipeline).__name__} cannot show previews (its "
                                                   "denoising loop does not hand out whole-picture latents per step)")
        return count

    @property
    def rank(self) -> int:
        """This process's rank in a sequence/CFG parallel run (0 in one process): rank 0 writes outputs."""
        groups = self.pipeline.parallel
        return 0 if groups is None else groups.rank

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "cpu", dtype: Any = None,
                        plugin_manager: Optional[PluginManager] = None, **engine_args) -> "DiffGenerator":
        """Load ``model`` (a Diffusers folder, a Hugging Face id or a registered alias).

        ``dtype=None`` uses the model's per-component precisions; ``dtype="float32"`` forces fp32.
        Other keywords are EngineArgs (attention_backend, cache, allow_pickle, revision, sp_degree,
        cfg_parallel, ...). With ``sp_degree``/``cfg_parallel`` call this on every rank of a torchrun job.
        """
        start = time.perf_counter()
        engine = EngineArgs.from_kwargs(device=device, dtype=dtype, **engine_args)
        registry = (plugin_manager or get_plugin_manager()).registry
        source = steps.resolve_source(model, engine, registry)
        steps.check_engine(source, engine, registry)  # before any weights are read
        engine = steps.parallel_layout(source, engine)
        placement = steps.choose_precision(source, engine)
        quantizer = steps.quantizer_for(engine)
        components = steps.load_components(source, engine, placement, registry, quantizer)
        hooks = steps.place_weights(components, source, engine, quantizer)
        pipeline = source.pipeline_cls(components, source.config, engine, components_checked=True, registry=registry,
                                       offload_hooks=hooks)
        pipeline.add_compositions(registry.compositions_for(source.index.class_name))  # img2img, inpaint: same weights
        log.info("loaded %s (%s via %s) in %.2fs", source.model, source.index.class_name, source.record.name,
                 time.perf_counter() - start)
        return cls(pipeline, source.sampling_params_cls, source.model, source.folder, time.perf_counter() - start,
                   registry=registry)

    def generate(self, prompt=None, negative_prompt=None, image=None, height=None, width=None, num_frames=None,
                 num_inference_steps=None, guidance_scale=None, true_cfg_scale=None,
                 max_sequence_length=None, seed: int = 0, output_type: str = "pil", callback=None,
                 block_callback=None, loras: Optional[dict] = None, on_preview=None, partial_images=None,
                 **kwargs) -> GenerationResult:
        """Generate; parameters left as None take the model's defaults. Unknown keywords are errors.

        ``callback(step, timestep, latents)`` is called after every denoising step. Block-causal video
        models (``WanCausalDMDPipeline``) call ``block_callback(block, latents, frames)`` as each block of
        latent frames is finished and decoded (``frames``: numpy (B, F, H, W, 3) in [0, 1]). ``loras``:
        ``{adapter name: weight}`` of loaded adapters to apply to this request only. ``on_preview(preview)``
        receives ``partial_images`` previews (default 3), spread over the steps: the predicted clean picture
        decoded at reduced cost (``diffcore.previews.Preview``: ``index``, ``step``, ``output``, ``images``).
        """
        self._preview_count(on_preview, partial_images)  # refused before any work
        req = self.request(dict(
            prompt=prompt, negative_prompt=negative_prompt, image=image, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, seed=seed,
            output_type=output_type, loras=loras, callback=callback, block_callback=block_callback, **kwargs))
        return self._run_one(self.attach_previews(req, on_preview, partial_images))

    # -- LoRA adapters ------------------------------------------------------------------------------
    def load_lora(self, source, name: Optional[str] = None, weight_name: Optional[str] = None, *,
                  component: str = "transformer", ignore_text_encoder: bool = False) -> str:
        """Load a LoRA (a ``.safetensors`` file, a folder or a Hugging Face repo id; ``weight_name`` picks
        the file as in diffusers) into ``component``, unapplied; returns its name (default: the file stem,
        or the folder / repo name for diffusers' ``pytorch_lora_weights.safetensors``).

        Diffusers/PEFT files and the community layouts the model's plugin converts are accepted.
        Use it per request with ``generate(..., loras={name: weight})`` or merge it with ``fuse_lora``.
        """
        registry = self.registry or get_plugin_manager().registry
        model = self.components.get(component)
        class_name = getattr(model, "diffusers_class_name", None) or type(model).__name__
        formats, others = registry.lora_formats(class_name)
        return self.pipeline.loras.load(source, name, weight_name, component=component, formats=formats,
                                        other_formats=others, ignore_text_encoder=ignore_text_encoder)

    def unload_lora(self, name: str, timeout: Optional[float] = None) -> None:
        """Forget an (unfused) adapter and free its weights, once the generations running with it are done
        (new ones can no longer pick it meanwhile); ``timeout`` seconds (0: do not wait) raise LoraInUseError."""
        self.pipeline.loras.unload(name, timeout=timeout)

    def fuse_lora(self, loras: dict, timeout: Optional[float] = None) -> None:
        """Merge ``{name: weight}`` into the model's weights: every later request uses them at no extra
        cost per step. Waits for running generations (later ones wait for the fuse), so no generation
        sees some steps fused and some not; ``timeout`` as in ``unload_lora``. ``unfuse_lora`` undoes it exactly."""
        self.pipeline.loras.fuse(loras, timeout=timeout)

    def unfuse_lora(self, timeout: Optional[float] = None) -> None:
        """Restore the weights as they were before ``fuse_lora``, bit for bit (ordered like ``fuse_lora``)."""
        self.pipeline.loras.unfuse(timeout=timeout)

    @property
    def loras(self) -> dict:
        """``{name: LoraInfo}``: source, format, ranks, target layers and fused weight of each adapter."""
        return self.pipeline.loras.infos

    # -- requests ---------------------------------------------------------------------------------
    def request(self, kwargs: dict, check_loras: bool = False) -> Request:
        """generate() keywords -> a validated Request, ready to run (``run_requests``, or a runner's
        ``submit``): the one conversion every entry point uses (diffcore.engine.intake). Bad input raises
        here (SamplingParamError names the parameter). ``check_loras``: also refuse adapters that are not
        loaded now (a server, on arrival; otherwise that is found when the request runs)."""
        req = intake.request_from(self.pipeline, self.sampling_params_cls, kwargs)
        if check_loras:
            self.pipeline.loras.check_selection(req.params.loras)
        return req

    def params_from(self, kwargs: dict):
        """The validated SamplingParams of generate() keywords (SamplingParamError names a bad one), of the
        composition they ask for (``image`` + ``strength``: img2img; ``mask``: inpainting; diffcore.tasks)."""
        return intake.params_from(self.pipeline, self.sampling_params_cls, kwargs)

    def params_class(self, kwargs: dict):
        """The SamplingParams class of the composition (task) these keywords ask for (diffcore.tasks): the model's
        own, or it plus ``strength`` / ``mask``; SamplingParamError where the model has no such composition."""
        return intake.params_class(self.pipeline, self.sampling_params_cls, kwargs)

    def check(self, kwargs: dict):
        """generate()'s own refusals of these keywords without running anything: the SamplingParams checks,
        the pipeline's input validation (the checkpoint's sizes and frame counts, parameters only some
        checkpoints take, the engine's budget) and the loaded adapters. Returns the SamplingParams."""
        return self.request(kwargs, check_loras=True).params

    def generate_batch(self, requests: list[dict]) -> list[GenerationResult]:
        """Run several generate() calls (dicts of its keywords) together; results in the same order.

        Compatible requests (same size, frames, steps and schedule, CFG on or off; see
        ``diffcore.engine.rows.batch_key``) share every text-encoder, transformer and VAE call, even
        with different prompts, seeds and guidance; each result equals that request's generate().
        Every request is validated first; the first bad one raises before anything runs.
        """
        if isinstance(requests, (str, bytes)) or not isinstance(requests, (list, tuple)):
            raise SamplingParamError("requests", f"generate_batch takes a list of dicts of generate() keywords, got "
                                                 f"{type(requests).__name__}")
        for i, kwargs in enumerate(requests):
            if not isinstance(kwargs, dict):
                raise SamplingParamError("requests", f"requests[{i}] must be a dict of generate() keywords such as "
                                                     f"{{'prompt': ...}}, got {type(kwargs).__name__} {kwargs!r:.60}")
        return _raised(self.run_requests([self.request(kwargs) for kwargs in requests]))

    def run_requests(self, reqs: list[Request], starting=None) -> list:
        """Run validated Requests (from ``request``), batched where compatible: in order, a GenerationResult
        or the exception that request failed with (None for one ``starting`` dropped; see ``run_batch``)."""
        from .engine.batching import run_batch

        start = time.perf_counter()
        validated = [sum(r.timings.values()) for r in reqs]  # the stages that ran when it was made
        outcomes = run_batch(self.pipeline, reqs, starting)
        for i, req in enumerate(outcomes):
            if isinstance(req, Request):
                req.timings["total"] = validated[i] + time.perf_counter() - start
                outcomes[i] = self.result(req)
        return outcomes

    def run(self, params, callback=None, block_callback=None) -> GenerationResult:
        """Run one request from a ready SamplingParams. Safe to call from several threads at once."""
        return self._run_one(self.pipeline.validate(self.new_request(params, callback, block_callback)))

    def _run_one(self, req: Request) -> GenerationResult:
        """One request's run (generate, run): its result (the engine warns about parameters nothing read)."""
        if req.block_callback is not None and not self.streams_blocks:
            notice(log, "block_callback is ignored: this model does not produce its frames block by block")
        return _raised(self.run_requests([req]))[0]  # run alone: the ignored-parameter rule applies

    def new_request(self, params, callback=None, block_callback=None) -> Request:
        """A fresh Request for ``params``: its own generator (seeded on the CPU), its own state (not validated:
        ``pipeline.forward`` validates it as its first stage)."""
        return intake.new_request(self.pipeline, params, callback, block_callback)

    def make_runner(self, max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                    step_batching: bool = True):
        """The batching scheduler a server hands its requests to (``BatchScheduler``; ``step_batching``: waiting
        requests join running batches at step boundaries)."""
        from .engine.batching import BatchScheduler

        return BatchScheduler(self, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                              step_batching=step_batching)

    def result(self, req: Request) -> GenerationResult:
        """What the caller gets from a finished Request: numpy output (torch for output_type="pt")."""
        params = req.params
        output, layers = None, _layers(req, self.config.is_video)
        if params.output_type == "pt":
            output = req.output.float().cpu()
        elif params.output_type != "latent":
            output = req.output.float().cpu().numpy()
        if output is not None and layers:  # several pictures per prompt: listed prompt by prompt
            output = output.reshape(-1, *output.shape[2:])
        fps = (params.fps or self.config.default_fps) if self.config.is_video else None
        stats = req.step_cache.stats if req.step_cache is not None else None
        audio = req.audio.float().cpu().numpy() if req.audio is not None and output is not None else None
        return GenerationResult(output=output, latents=req.latents, timings=dict(req.timings),
                                is_video=self.config.is_video, fps=fps, output_type=params.output_type,
                                cache_stats=dict(stats) if stats is not None else None, audios=audio,
                                audio_sample_rate=req.audio_sample_rate if audio is not None else None,
                                layers=layers, ignored_parameters=tuple(sorted(ignored.unread(req))))


def _layers(req: Request, is_video: bool) -> Optional[int]:
    """Pictures per prompt when an image model makes several (Qwen-Image-Layered's RGBA layers: its output is
    (prompts, layers, H, W, C)); None otherwise."""
    return req.output.shape[1] if req.output is not None and not is_video and req.output.ndim == 5 else None


def _raised(outcomes: list) -> list:
    """The results, or the first request's exception raised."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
