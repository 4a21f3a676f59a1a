"""Find a Diffusers pipeline folder (local or on the Hugging Face Hub) and read its ``model_index.json``.

A Diffusers folder has ``model_index.json`` at the top, naming each component and the library and
class that builds it, plus one subfolder per component (``transformer/``, ``vae/``, ``scheduler/``...).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import attrs

from ..errors import ConfigFileError, LoaderError, MissingFileError
from .containment import check_folder, explicit_bool

log = logging.getLogger(__name__)

FOLDER_LAYOUT = (
    "a Diffusers folder has model_index.json at its top and one subfolder per component "
    "(e.g. transformer/config.json + diffusion_pytorch_model.safetensors, vae/, text_encoder/, "
    "tokenizer/, scheduler/scheduler_config.json)"
)

# What snapshot_download fetches by default: configs, safetensors weights, tokenizer files. Pickle
# weights only on opt-in; other formats (onnx, flax, images, custom code) never.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken", "*.jinja"]
HUB_PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
# Precision variants (``*.fp16.safetensors``) duplicate the main weights; fetched only when asked for.
HUB_VARIANTS = ("fp16", "bf16", "fp8")
HUB_IGNORE_PATTERNS = [f"*.{v}{end}" for v in HUB_VARIANTS for end in (".*", "-*")]


def hub_ignore_patterns(variant: str | None = None) -> list[str]:
    return [p for p in HUB_IGNORE_PATTERNS if variant is None or not p.startswith(f"*.{variant}")]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@attrs.frozen
class ComponentSpec:
    """One ``model_index.json`` entry: ``"vae": ["diffusers", "AutoencoderKL"]``."""

    name: str
    library: str | None
    class_name: str


@attrs.frozen
class ModelIndex:
    """The parsed ``model_index.json`` of a pipeline folder."""

    class_name: str
    diffusers_version: str | None
    components: dict[str, ComponentSpec]
    extra: dict[str, Any]  # pipeline-level settings, e.g. boundary_ratio, expand_timesteps, is_distilled
    folder: Path
    name_or_path: str | None = None  # ``_name_or_path``: the Hub id it was saved from, if recorded


def read_json(path: Path, what: str = "config file") -> dict:
    """Read a JSON object; errors name the file, and the line and column of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigFileError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "the file may be truncated or edited by hand, re-download it"
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{what} {path} is not UTF-8 text ({e}); re-download it") from e
    if not isinstance(data, dict):
        raise ConfigFileError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def _is_component(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def read_model_index(folder: str | os.PathLike) -> ModelIndex:
    """Parse ``<folder>/model_index.json``; ``[null, null]`` entries (absent optional components) are skipped."""
    folder = Path(folder)
    path = folder / "model_index.json"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist; {FOLDER_LAYOUT}")
    data = read_json(path, "model index")
    class_name = data.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise ConfigFileError(f"{path} has no '_class_name' (the Diffusers pipeline class, e.g. \"<Name>Pipeline\")")
    components: dict[str, ComponentSpec] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith("_"):
            continue
        if _is_component(value):
            library, cls = value
            if cls is None:
                continue
            components[key] = ComponentSpec(name=key, library=library, class_name=cls)
        else:
            extra[key] = value
    return ModelIndex(
        class_name=class_name,
        diffusers_version=data.get("_diffusers_version"),
        components=components,
        extra=extra,
        folder=folder,
        name_or_path=data.get("_name_or_path"),
    )


def _offline() -> bool:
    """Read at call time (huggingface_hub reads its constant once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _check_local_folder(path: Path, allow_external_links: bool) -> Path:
    if not path.is_dir():
        raise MissingFileError(f"{path} is a file, not a folder; {FOLDER_LAYOUT}")
    if not (path / "model_index.json").is_file():
        raise MissingFileError(f"{path} has no model_index.json, so it is not a Diffusers folder; {FOLDER_LAYOUT}")
    check_folder(path, allow_external_links=allow_external_links)
    return path.resolve()


def resolve_model_path(
    model: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    variant: str | None = None,
    allow_external_links: bool = False,
) -> Path:
    """Return the local Diffusers folder for ``model``: an existing folder, or a Hub repo id fetched
    with ``snapshot_download`` (uses the HF cache; honours ``HF_HUB_OFFLINE``, ``revision``). Precision
    variant files are fetched only for the ``variant`` asked for (with the plain files, which components
    without that variant use). Every entry of the folder must resolve inside it (``containment``)."""
    explicit_bool("allow_pickle", allow_pickle)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            log.warning("revision=%r is ignored for the local folder %s", revision, path)
        return _check_local_folder(path, allow_external_links)
    if not _REPO_ID.match(text) or text.startswith(".") or "\\" in text:
        raise MissingFileError(
            f"local folder {path} does not exist (and {text!r} is not a Hugging Face repo id like 'org/name'); "
            f"{FOLDER_LAYOUT}"
        )

    from huggingface_hub import constants, snapshot_download

    offline = _offline()
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    allow = HUB_ALLOW_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = snapshot_download(
            repo_id=text,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=allow,
            ignore_patterns=hub_ignore_patterns(variant),
            local_files_only=offline,
        )
    except Exception as e:  # hub errors, network errors, invalid ids: all become one actionable message
        rev = f" at revision {revision!r}" if revision else ""
        fix = (
            f"download it once with network access (`hf download {text}`), or pass the path of a local Diffusers folder"
        )
        if offline:
            msg = (
                f"{text!r}{rev} is not a local folder and was not found in the Hugging Face cache {cache}; "
                f"HF_HUB_OFFLINE is set, so it cannot be downloaded. Fix: {fix} (unset HF_HUB_OFFLINE to let "
                "diffcore download it)"
            )
        else:
            msg = (
                f"{text!r}{rev} is not a local folder and could not be fetched from the Hugging Face Hub "
                f"({type(e).__name__}: {e}). Check the repo id and revision, your network, and for gated repos "
                f"your token (`hf auth login`); or {fix}"
            )
        raise LoaderError(msg) from e
    folder = Path(local)
    if not (folder / "model_index.json").is_file():
        raise MissingFileError(
            f"Hub repo {text!r} (downloaded to {folder}) has no model_index.json: it is not a Diffusers pipeline repo"
        )
    check_folder(folder, allow_external_links=allow_external_links)
    return folder
