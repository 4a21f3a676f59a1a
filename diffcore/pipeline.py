"""ComposedPipelineBase: a named chain of stages whose dataflow is proven when it is built."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

import torch

from . import ignored, notices, parallel
from .cache import base as step_cache
from .configs import budget
from .configs.engine_args import EngineArgs
from .configs.pipeline_config import PipelineConfig
from .engine import rows
from .engine.context import EngineContext
from .errors import ComponentClassError, ConfigError, PipelineDataflowError, RegistryError
from .lora.manager import LoraManager
from .lora.runtime import lora_scope
from .parallel import ParallelGroups
from .request import REQUEST_INPUTS, Request
from .stages.base import PipelineStage

if TYPE_CHECKING:
    from .models.attention import Backend


def hook_reads(config: PipelineConfig, stage: PipelineStage) -> list:
    """The fields ``config.hook_inputs()`` declares for ``stage``'s class (and its base classes)."""
    reads = []
    for cls, fields in config.hook_inputs().items():
        if not (isinstance(cls, type) and issubclass(cls, PipelineStage)):
            raise ConfigError(f"{type(config).__name__}.hook_inputs() keys its reads by stage class (e.g. "
                              f"DenoisingLoopStage), got {cls!r}")
        if isinstance(stage, cls):
            reads.extend(f for f in fields if f.name not in {r.name for r in reads})
    return reads


def _registry(registry):
    if registry is not None:
        return registry
    from .plugins import get_plugin_manager

    return get_plugin_manager().registry


def resolve_attention_backend(engine_args: EngineArgs, registry=None) -> Optional[Backend]:
    """The backend ``attention_backend`` names: built in, or one of ``registry``'s plugins (ConfigError if none)."""
    if not engine_args.attention_backend:
        return None
    from .models import attention

    name = engine_args.attention_backend
    return attention.resolve_backend(name, None if name in attention.available_backends() else _registry(registry))


def resolve_cache_policy(engine_args: EngineArgs, registry=None) -> Optional[Callable[..., Any]]:
    """The step-cache class ``cache`` names in ``registry`` (RegistryError lists the installed ones)."""
    return _registry(registry).get("cache_policies", engine_args.cache) if engine_args.cache else None


class ComposedPipelineBase:
    """Subclasses set ``pipeline_name`` (the Diffusers ``_class_name`` served),
    ``_required_config_modules`` and implement ``create_pipeline_stages``.

    The pipeline owns the loaded components, the engine choices (``engine_args``, the user's record) and
    what they resolve to, for this pipeline only: the attributes below, resolved once when it is built
    (names with ``registry``, its plugin registry; default: the process-wide one), and ``context``, the
    context variables its forward runs under (attention backend, step-cache factory, budget, parallel
    groups). It holds no per-request state: ``forward`` may run in several threads at once.
    """

    pipeline_name: ClassVar[str] = ""
    _required_config_modules: ClassVar[tuple[str, ...]] = ()
    # Diffusers class names a component must have, where the pipeline cannot run with any other (its
    # transformer, its VAE): a folder of another family declared as this pipeline is refused before loading
    # (ComponentClassError naming the component), instead of failing in the middle of a generation. Every
    # pipeline declares at least its transformer and VAE (tests/test_component_classes.py checks them all).
    component_classes: ClassVar[dict[str, tuple[str, ...]]] = {}
    # A composition registered for another pipeline's components (diffcore.tasks): its task, and the
    # default ``strength`` of its requests (diffusers' call default).
    task: ClassVar[Optional[str]] = None
    default_strength: ClassVar[float] = 0.6
    crops_to_mask: ClassVar[bool] = False  # an inpaint composition taking padding_mask_crop (diffcore.mask_crop)

    attention_backend: Optional[Backend]  # engine_args.attention_backend resolved (None: the default, sdpa)
    cache_policy: Optional[Callable[..., Any]]  # the step-cache class engine_args.cache names (None: no cache)
    offload_hooks: Optional[dict]  # diffcore.offload.apply's hooks when the weights are offloaded
    parallel: Optional[ParallelGroups]  # the process groups of sequence/CFG parallelism (None in one process)

    def __init__(self, components: dict[str, Any], config: PipelineConfig, engine_args: Optional[EngineArgs] = None,
                 components_checked: bool = False, *, registry=None, offload_hooks: Optional[dict] = None):
        if not components_checked:  # from_pretrained checks model_index.json before loading any weights
            self.check_components(components, config)
        self.components, self.config = components, config
        config.configure_from_components(components)
        self.engine_args = engine_args = engine_args or EngineArgs()
        self.attention_backend = resolve_attention_backend(engine_args, registry)
        self.cache_policy = resolve_cache_policy(engine_args, registry)
        self.offload_hooks = offload_hooks
        self.parallel = None
        if engine_args.world_size > 1:
            self.parallel = ParallelGroups(engine_args.sp_degree, engine_args.cfg_parallel, engine_args.device)
        self.context = self.engine_context(engine_args)
        self.loras = LoraManager(components)  # loaded adapters; each request picks its own (params.loras)
        self.stages: list[PipelineStage] = []
        self.compositions: dict[str, ComposedPipelineBase] = {}  # task -> composition on these components
        self.create_pipeline_stages(self.engine_args)
        self.check_dataflow()

    @classmethod
    def check_components(cls, components: dict[str, Any], config: PipelineConfig) -> None:
        """Refuse a checkpoint lacking a required component (the loader calls this before loading anything)."""
        missing = [m for m in cls._required_config_modules
                   if components.get(m) is None and m not in config.optional_components]
        if missing:
            raise RegistryError(
                f"{cls.pipeline_name}: model_index.json lacks required component(s) {', '.join(missing)}; "
                f"this pipeline needs {', '.join(cls._required_config_modules)}"
            )
        for name, accepted in cls.component_classes.items():
            found = components.get(name)
            # a model_index entry, or a loaded module (a conformance check's placeholder has no class to compare)
            found = getattr(found, "class_name", None) or getattr(found, "diffusers_class_name", None) or \
                (type(found).__name__ if isinstance(found, torch.nn.Module) else None)
            if found is not None and found not in accepted:
                raise ComponentClassError(cls.pipeline_name, name, found, accepted)

    def new_step_cache(self):
        """One fresh step cache of this pipeline's policy (a request's own), or None without one."""
        if self.cache_policy is None:
            return None
        return self.cache_policy(threshold=self.engine_args.cache_threshold)

    def engine_context(self, engine_args: EngineArgs) -> EngineContext:
        """The context variables every forward of this pipeline runs under (subclasses may add)."""
        from .models import attention

        context = EngineContext()
        if self.attention_backend is not None:
            context.set(attention.BACKEND, self.attention_backend)
        if self.cache_policy is not None:  # the denoising loops make each request's cache with it
            context.set(step_cache.FACTORY, self.new_step_cache)
        context.set(budget.CURRENT, engine_args.budget())  # InputValidationStage checks each request against it
        if self.parallel is not None:  # the attention dispatch and the denoising loop find our groups here
            context.set(parallel.CURRENT, self.parallel)
        return context

    # -- composition -------------------------------------------------------------------------
    def create_pipeline_stages(self, engine_args: EngineArgs) -> None:
        raise NotImplementedError

    def add_stage(self, name: str, stage: PipelineStage) -> None:
        if any(s.name == name for s in self.stages):
            raise ValueError(f"{self.pipeline_name}: duplicate stage name {name!r}")
        stage.name = name
        reads = tuple(f for f in hook_reads(self.config, stage) if f.name not in {i.name for i in stage.inputs})
        if reads:  # what the config's hooks read in this stage joins the stage's contract
            stage.inputs = tuple(stage.inputs) + reads
        self.stages.append(stage)

    def stage(self, name: str) -> PipelineStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.pipeline_name} has no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def check_dataflow(self) -> None:
        """Prove every required input is supplied by the request or an earlier stage (and not consumed since)."""
        available = set(REQUEST_INPUTS)
        for stage in self.stages:
            for field in stage.inputs:
                if field.required and field.name not in available:
                    raise PipelineDataflowError(self.pipeline_name, stage.name, field.name, sorted(available))
            available.update(f.name for f in stage.outputs)
            available.difference_update(stage.consumes)
        for field in ("audio", "audio_sample_rate") if self.config.has_audio else ():
            if field not in available:  # the config promises a sound track: some stage must write it
                raise PipelineDataflowError(self.pipeline_name, "(result)", field, sorted(available))

    # -- tasks (diffcore.tasks) ----------------------------------------------------------------
    def add_compositions(self, classes: dict[str, type]) -> None:
        """Build ``{task: ComposedPipelineBase subclass}`` on this pipeline's components: each shares the
        weights, the engine's context and parallel groups, and the loaded LoRA adapters; only its stages
        are its own."""
        for task, cls in classes.items():
            other = cls.__new__(cls)
            other.__dict__.update(self.__dict__)
            other.stages, other.compositions = [], {}
            other.create_pipeline_stages(self.engine_args)
            other.check_dataflow()
            self.compositions[task] = other

    def for_request(self, req: Request) -> "ComposedPipelineBase":
        """The composition that serves ``req``: its SamplingParams say which task (``params.task``)."""
        task = getattr(type(req.params), "task", None)
        if task == self.task:
            return self
        if task not in self.compositions:
            raise RegistryError(f"{self.pipeline_name} has no {task} composition; it serves "
                                f"{', '.join([self.task or 'its own task'] + sorted(self.compositions))}")
        return self.compositions[task]

    # -- execution ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, req: Optional[Request] = None) -> Iterator[None]:
        """The engine's choices for the enclosed stage calls: its context variables, its thread count and
        ``req``'s LoRA selection (per row for a batch of requests with different adapters)."""
        if self.engine_args.num_threads:
            torch.set_num_threads(self.engine_args.num_threads)
        # this request's (or batch rows') adapters, this thread only; held against unload / fuse until done
        with self.loras.in_use(req) as selection, self.context.applied(), lora_scope(selection):
            yield

    def validate(self, req: Request) -> Request:
        """Run ``req``'s input validation (the leading validation stages) under the engine's context (its
        budget): what a request is refused for before any model call (sizes, frame counts, parameters this
        checkpoint cannot use). Done once per request, when it is made (diffcore.engine.intake); a server
        does it when a request arrives, so a bad one is refused before it is queued. ``forward`` goes on
        from there. What it noticed (a rounded size) is said when the request runs."""
        from .stages.input_validation import InputValidationStage

        pipeline = self.for_request(req)  # the composition (task) its parameters ask for
        with pipeline.context.applied(), notices.kept(req.notices), ignored.recording(req.params_read):
            while req.stages_done < len(pipeline.stages) and \
                    isinstance(pipeline.stages[req.stages_done], InputValidationStage):
                req = pipeline.stages[req.stages_done](req)
                req.stages_done += 1
        return req

    def forward(self, req: Request, stop: Optional[int] = None, parts: Optional[list[Request]] = None) -> Request:
        """The stage loop: run ``req``'s remaining stages, from ``req.stages_done`` up to index ``stop`` (default:
        the end), under the engine's choices (``running``). Every way of running a request comes through here
        (in the composition its parameters ask for: ``for_request``).

        ``parts``: ``req`` is a batch merged from these requests (diffcore.engine.rows); a stage that runs per
        request (``batch == "each"``) runs on every part and its outputs are merged into the batch."""
        if self.for_request(req) is not self:
            return self.for_request(req).forward(req, stop, parts)
        stop = len(self.stages) if stop is None else stop
        with self.running(req), ignored.recording(req.params_read):
            notices.say(req.notices)
            while req.stages_done < stop:
                stage = self.stages[req.stages_done]
                if parts is None or stage.batch == "rows":
                    req = stage(req)
                else:
                    for part in parts:
                        stage(part)
                    rows.merge_outputs(req, parts, [f.name for f in stage.outputs])
                req.stages_done += 1
                notices.say(req.notices)
        return req

    def __repr__(self) -> str:
        chain = "\n  ".join(repr(s) for s in self.stages)
        return f"{type(self).__name__}[{self.pipeline_name}]:\n  {chain}"
