"""Build one pipeline component from its subfolder, dispatching on the ``model_index.json`` entry.

- a diffcore model registered for the Diffusers class name: ``config.json`` -> module on the meta
  device -> safetensors assigned into it;
- a diffcore scheduler registered for the class name: ``scheduler_config.json``;
- library ``transformers``: the class of that name from ``transformers`` (text encoders, tokenizers,
  processors), read with ``local_files_only=True``; the common text encoders are built and assigned
  memory-mapped weights by diffcore (``transformers_models``), the rest go through ``from_pretrained``;
- ``custom_loaders`` (keyed by component name or class name) take precedence over all of these, for
  components the generic paths cannot build.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import (CheckpointVariantError, ConfigError, DiffcoreError, LoaderError, MissingFileError, RegistryError,
                      WeightMismatchError)
from . import key_layouts as layouts
from .config_types import build, check_config
from .containment import explicit_bool
from .model_index import ComponentSpec, read_json
from .required_files import check_transformers_folder
from .safetensors_io import load_into_module, skip_init
from .weight_files import check_pickle_consent, find_weight_files
from .weight_reading import file_keys, file_shapes
from .size_guard import check_depths, guarded_build
from .transformers_models import load_fast

log = logging.getLogger(__name__)

CustomLoader = Callable[[Path, ComponentSpec, "torch.dtype | None", "torch.device | str"], Any]


def _load_model(path: Path, spec: ComponentSpec, cls: type, dtype, device, allow_pickle: bool, files=None,
                variant=None, classes: Mapping[str, type] | None = None, on_module=None):
    config = read_json(path / "config.json", f"config of component {spec.name!r}")
    saved = config.get("_class_name")
    if saved is not None and saved != spec.class_name:
        log.warning("%s/config.json says _class_name=%r, model_index.json says %r; using %s",
                    path, saved, spec.class_name, cls.__name__)
    with skip_init(), guarded_build(config, path / "config.json"):  # absurd sizes refused before allocating
        model = _from_config(cls, config, path / "config.json", device="meta")
    files = files or find_weight_files(path, allow_pickle=allow_pickle, variant=variant)
    try:
        load_into_module(model, files, key_map=cls.map_state_dict_key, dtype=dtype, device=device,
                         on_module=on_module)
    except WeightMismatchError as e:
        _raise_if_other_variant(files, cls, config, path / "config.json", e)
        hint = _other_model_hint(files, cls, classes or {})
        if hint:
            err = WeightMismatchError(f"{hint} {e}")
            err.missing, err.unexpected, err.mismatched, err.files = e.missing, e.unexpected, e.mismatched, e.files
            raise err from e
        raise
    return model.eval().requires_grad_(False)


def _raise_if_other_variant(files, cls: type, config: dict, config_file: Path, error: WeightMismatchError) -> None:
    """A weight file of another variant of this model (its class names variants): a CheckpointVariantError
    saying which variant the file is and which the folder's config.json describes."""
    of_config = cls.variant_of_config(config) if hasattr(cls, "variant_of_config") else None
    if of_config is None:
        return
    shapes = {}
    for key, shape in file_shapes(files, tuple(getattr(cls, "checkpoint_layouts", ()))).items():
        name = cls.map_state_dict_key(key)
        if name is not None:
            shapes[name] = shape
    of_file = cls.variant_of_weights(shapes)
    if of_file is None or of_file == of_config:
        return
    names = ", ".join(Path(f).name for f in files)
    err = CheckpointVariantError(
        f"{names} holds {of_file}, but {config_file} describes {of_config}: load the file with a folder of its "
        f"own variant, or give this folder a file of its variant. ({error})", file_variant=of_file,
        config_variant=of_config)
    err.missing, err.unexpected, err.mismatched, err.files = error.missing, error.unexpected, error.mismatched, error.files
    raise err from error


def _other_model_hint(files, cls: type, classes: Mapping[str, type]) -> str:
    """Which other registered model a weight file that does not fit ``cls`` belongs to, if its keys say."""
    others = {}
    for name in list(classes):  # resolved only now, on the error path
        try:
            c = classes[name]
        except Exception:  # noqa: BLE001  (a plugin that cannot import is no candidate)
            continue
        if isinstance(c, type) and not issubclass(c, cls) and not issubclass(cls, c):
            others[name] = c
    for f in files:
        keys = file_keys(f)
        if layouts.identify(keys, {cls.__name__: cls}):
            continue  # this model's own layout: the mismatch is something else (the config, a truncated file)
        found = layouts.identify(keys, others)
        if found:
            said = "; ".join(f"the {layout} layout of {', '.join(names)}" for layout, names in found.items())
            return (f"{Path(f).name} holds the weights of another model ({said}), not of {cls.__name__}: "
                    "use it with that model's pipeline, or give this model its own file.")
    return ""


def _load_scheduler(path: Path, spec: ComponentSpec, cls: type):
    file = path / "scheduler_config.json"
    return _from_config(cls, read_json(file, f"scheduler config of component {spec.name!r}"), file)


def _from_config(cls: type, config: dict, file: Path, **kwargs):
    """``cls.from_config(config)``; a value of the wrong type is a ConfigFileError naming ``file`` and the field."""
    if "source" in inspect.signature(cls.from_config).parameters:  # diffcore's base classes check it themselves
        return cls.from_config(config, source=file, **kwargs)
    check_config(cls.__init__, config, file)  # a plugin's own class with its own from_config
    return build(lambda: cls.from_config(config, **kwargs), cls, file)


def _dtype_kwarg() -> str:
    """transformers >= 4.56 spells it ``dtype``; older releases only know ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load_transformers(path: Path, spec: ComponentSpec, dtype, device, allow_pickle: bool, variant=None):
    import transformers

    cls = getattr(transformers, spec.class_name, None)
    if not isinstance(cls, type):
        raise RegistryError(
            f"component {spec.name!r}: transformers {transformers.__version__} has no class {spec.class_name!r}; "
            "upgrade transformers, or pass a custom loader for this component"
        )
    check_transformers_folder(path, cls, f"component {spec.name!r} (transformers.{spec.class_name})")
    try:
        if issubclass(cls, transformers.PreTrainedModel):
            files = find_weight_files(path, allow_pickle=allow_pickle, variant=variant)  # same errors as diffcore models
            check_depths(read_json(path / "config.json"), path / "config.json")
            model = load_fast(cls, path, files, dtype, device)
            if model is not None:
                return model.eval().requires_grad_(False)
            kwargs = {"local_files_only": True, "use_safetensors": True if not allow_pickle else None}
            # variant files: model.fp16.safetensors, or shards model.fp16-00001-of-00002.safetensors
            if variant and any(f".{variant}." in f.name or f".{variant}-" in f.name for f in files):
                kwargs["variant"] = variant
            if dtype is not None:
                kwargs[_dtype_kwarg()] = dtype
            model = cls.from_pretrained(path, **kwargs)
            return model.to(device).eval().requires_grad_(False)
        return cls.from_pretrained(path, local_files_only=True)
    except DiffcoreError:
        raise
    except ImportError as e:
        raise LoaderError(
            f"component {spec.name!r} (transformers.{spec.class_name}) in {path} needs an optional dependency: {e}. "
            "Install it, or pass a custom loader for this component"
        ) from e
    except Exception as e:
        raise LoaderError(
            f"component {spec.name!r} (transformers.{spec.class_name}) cannot be loaded from {path}: "
            f"{type(e).__name__}: {e}"
        ) from e


def load_component(
    folder: Path,
    spec: ComponentSpec,
    *,
    module_classes: Mapping[str, type],
    scheduler_classes: Mapping[str, type],
    dtype: torch.dtype | None,
    device: torch.device | str,
    allow_pickle: bool = False,
    custom_loaders: Mapping[str, CustomLoader] | None = None,
    weight_files: Sequence[Path] | None = None,
    variant: str | None = None,
    on_module: Callable[[torch.nn.Module], None] | None = None,
) -> Any:
    """Load component ``spec`` from ``<folder>/<spec.name>``.

    ``module_classes`` / ``scheduler_classes`` map Diffusers class names to diffcore classes
    (:class:`~diffcore.models.base.ModelMixin` / scheduler subclasses). A custom loader is called as
    ``loader(component_folder, spec, dtype, device)``; it is looked up by component name first,
    then by class name. ``weight_files`` (diffcore models only) replace the folder's weights, e.g. a
    ``.gguf`` transformer beside the folder's ``config.json``. ``variant`` (e.g. ``"fp16"``) prefers
    ``*.<variant>.safetensors`` weights, as in diffusers. ``on_module`` (diffcore models only; others
    ignore it) is called with each submodule as soon as its weights are in place (``assign_weights``).
    """
    explicit_bool("allow_pickle", allow_pickle)
    folder = Path(folder)
    path = folder / spec.name
    if weight_files:
        check_pickle_consent(weight_files, allow_pickle, spec.name)
    custom = custom_loaders or {}
    loader = custom.get(spec.name) or custom.get(spec.class_name)
    if loader is not None:
        return loader(path, spec, dtype, device)
    if not path.is_dir():
        raise MissingFileError(
            f"component {spec.name!r} ({spec.library}.{spec.class_name}) is listed in "
            f"{folder / 'model_index.json'} but its folder {path} does not exist"
        )
    if weight_files and spec.class_name not in module_classes:
        raise ConfigError(f"component {spec.name!r} ({spec.library}.{spec.class_name}) is not a diffcore model; "
                          "only transformers and VAEs can load their weights from a separate file")
    if spec.class_name in module_classes:
        return _load_model(path, spec, module_classes[spec.class_name], dtype, device, allow_pickle, weight_files,
                           variant, module_classes, on_module)
    if spec.class_name in scheduler_classes:
        return _load_scheduler(path, spec, scheduler_classes[spec.class_name])
    if spec.library == "transformers":
        return _load_transformers(path, spec, dtype, device, allow_pickle, variant)
    known = sorted(module_classes) + sorted(scheduler_classes)
    raise RegistryError(
        f"component {spec.name!r}: no diffcore class is registered for {spec.library}.{spec.class_name} "
        f"(registered for {spec.library}: {', '.join(known) or 'none'}); install or enable the plugin that "
        "supports this model, or pass a custom loader for this component"
    )
