"""Every error diffcore raises on purpose: each names what is wrong and what to do about it."""
from __future__ import annotations


class DiffcoreError(Exception):
    """Base class for diffcore errors."""


class ConfigError(DiffcoreError, ValueError):
    """A configuration or sampling parameter is invalid."""


class SamplingParamError(DiffcoreError, ValueError):
    """A sampling parameter (what one request asks for) has a bad value; names the parameter and what is
    accepted. Not a ConfigError (how the engine or the model is set up): the server answers each class on
    its own terms (this one: 400 naming ``param``)."""

    def __init__(self, param: str, reason: str):
        self.param, self.reason = param, reason
        super().__init__(f"invalid sampling parameter {param!r}: {reason}")


class StageVerificationError(DiffcoreError):
    """A stage's input or output failed its declared contract."""

    def __init__(self, stage: str, field: str, reason: str):
        self.stage, self.field, self.reason = stage, field, reason
        super().__init__(f"stage {stage!r}, field {field!r}: {reason}")


class PipelineDataflowError(DiffcoreError):
    """Build-time proof failed: a stage needs a field nothing before it produces."""

    def __init__(self, pipeline: str, stage: str, field: str, available: list[str]):
        self.pipeline, self.stage, self.field = pipeline, stage, field
        super().__init__(
            f"pipeline {pipeline!r}: stage {stage!r} requires {field!r}, which neither the request nor an "
            f"earlier stage produces (available at that point: {', '.join(sorted(available)) or 'nothing'})"
        )


class NonFiniteError(DiffcoreError, ArithmeticError):
    """A generation produced NaN or inf values (it would be a black picture); names the likely cause."""


class PluginError(DiffcoreError):
    """A plugin failed to load or register, or conflicts with another plugin."""


class RegistryError(DiffcoreError, LookupError):
    """A lookup in the registry failed (unknown model, pipeline, module or scheduler)."""


class ComponentClassError(RegistryError):
    """A folder declared as a pipeline whose components it does not have (``model_index.json``'s
    ``_class_name`` names another family's pipeline): names the component, the class found and those accepted."""

    def __init__(self, pipeline: str, component: str, found: str, accepted: tuple):
        self.pipeline, self.component, self.found, self.accepted = pipeline, component, found, tuple(accepted)
        super().__init__(
            f"{pipeline}: its component {component!r} is a {found}, but this pipeline runs with "
            f"{' or '.join(accepted)}; model_index.json's _class_name does not match the folder's components "
            "(a checkpoint of another family?): fix _class_name, or load the folder with its own pipeline")


class LoaderError(DiffcoreError):
    """Loading a checkpoint failed."""


class MissingFileError(LoaderError, FileNotFoundError):
    """A file the checkpoint needs is not there."""


class ConfigFileError(LoaderError, ConfigError):
    """A checkpoint's JSON file is not valid JSON, lacks a required key, or holds a value of the wrong
    type for the module it builds; ``file`` and ``field`` name where (when known)."""

    def __init__(self, message: str, *, file=None, field=None):
        self.file, self.field = (str(file) if file is not None else None), field
        super().__init__(message)


class CorruptCheckpointError(LoaderError):
    """A weight file cannot be parsed (truncated download, wrong format)."""


class WeightMismatchError(LoaderError):
    """Checkpoint keys or shapes do not fit the module built from its config."""


class CheckpointVariantError(WeightMismatchError):
    """The weight file is another variant of the same model than the folder's config.json describes (e.g. a
    FLUX.2 [dev] transformer given to a [klein] folder); ``file_variant`` and ``config_variant`` name both."""

    def __init__(self, message: str, *, file_variant=None, config_variant=None):
        self.file_variant, self.config_variant = file_variant, config_variant
        super().__init__(message)


class UnsafePathError(LoaderError):
    """A model folder refers to a file outside itself (an absolute path, '..', or a link leaving the folder);
    ``file`` is where the reference is, ``entry`` the JSON key or folder entry that makes it."""

    def __init__(self, message: str, *, file=None, entry=None):
        self.file, self.entry = (str(file) if file is not None else None), entry
        super().__init__(message)


class PickleRefusedError(LoaderError):
    """Only pickle weights (.bin/.pt/.ckpt) exist and the user did not opt in to executing them."""


class InputError(DiffcoreError, ValueError):
    """A user input (image file, prompt) cannot be used."""


class LoraError(DiffcoreError):
    """A LoRA adapter cannot be loaded, selected, fused or removed; names the adapter and the problem.

    The base model is never left half-modified: the operation that raised changed nothing.
    """

    def __init__(self, adapter: str, problem: str):
        self.adapter, self.problem = adapter, problem
        super().__init__(f"LoRA {adapter!r}: {problem}")


class LoraFormatError(LoraError):
    """The file is not a LoRA diffcore can read for this model (unknown layout, unmatched or text-encoder keys)."""


class LoraShapeError(LoraError):
    """A LoRA matrix does not fit the layer it targets (made for another model family or size)."""


class LoraNotFoundError(LoraError, LookupError):
    """An adapter name that is not loaded (in a request, fuse_lora or unload_lora)."""


class LoraInUseError(LoraError):
    """An adapter change (unload, fuse, unfuse) would wait for running generations longer than allowed."""


class QueueFullError(DiffcoreError):
    """The batch scheduler's queue is full: retry later (a server answers 429 / 503)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        super().__init__(f"the request queue is full ({max_queue} waiting); retry later or raise max_queue")


class EngineShutdownError(DiffcoreError):
    """The engine (batch scheduler) is shut down and takes no new requests."""

    def __init__(self):
        super().__init__("the batch scheduler has been shut down and accepts no new requests; create a new one")


class RequestCancelledError(DiffcoreError):
    """The request was cancelled while it ran (client gone, timeout, DELETE): the engine stopped it at the next
    denoising step boundary and freed its compute; there is no result."""

    def __init__(self, steps_done: int = 0):
        self.steps_done = steps_done
        super().__init__(f"the request was cancelled while it ran; it stopped after {steps_done} denoising step(s)")


class ParallelConfigError(ConfigError):
    """A sequence/CFG parallel layout cannot run: wrong world size, heads not divisible, unsupported model."""
