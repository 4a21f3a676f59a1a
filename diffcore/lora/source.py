"""Find and read a LoRA file: a local ``.safetensors`` file, a folder, or a Hugging Face repo id.

Like diffusers' ``load_lora_weights``: a folder or repo holding one ``.safetensors`` file (or
``pytorch_lora_weights.safetensors``) needs no ``weight_name``; otherwise ``weight_name`` picks the
file. Only safetensors are read: a LoRA is never unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import LoraFormatError, UnsafePathError
from ..loader.containment import check_name
from ..loader.model_index import _REPO_ID, _offline

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the LoraConfig (JSON)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _pick_in_folder(folder: Path, weight_name: Optional[str], label: str) -> Path:
    if weight_name is not None:
        try:
            path = check_name(folder, weight_name, source=folder, entry="weight_name")
        except UnsafePathError as e:
            raise LoraFormatError(label, str(e)) from e
        if not path.is_file():
            raise LoraFormatError(label, f"{folder} has no file {weight_name!r}")
        return path
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if DIFFUSERS_WEIGHT_NAME in files:
        return folder / DIFFUSERS_WEIGHT_NAME
    if len(files) == 1:
        return folder / files[0]
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        extra = f" (only pickle files {', '.join(pickles)}: LoRAs are read from safetensors only)" if pickles else ""
        raise LoraFormatError(label, f"{folder} has no .safetensors file{extra}")
    raise LoraFormatError(label, f"{folder} has several .safetensors files ({', '.join(files)}); pass weight_name=")


def _from_hub(repo: str, weight_name: Optional[str], label: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    offline = _offline()
    try:
        if weight_name is None:
            if offline:
                raise LoraFormatError(label, f"HF_HUB_OFFLINE is set: pass weight_name= to find {repo!r} in the cache")
            files = [f for f in list_repo_files(repo) if f.endswith(".safetensors")]
            if DIFFUSERS_WEIGHT_NAME in files or len(files) != 1:
                if DIFFUSERS_WEIGHT_NAME not in files:
                    raise LoraFormatError(label, f"repo {repo!r} has {len(files)} .safetensors files "
                                                 f"({', '.join(files[:8]) or 'none'}); pass weight_name=")
                weight_name = DIFFUSERS_WEIGHT_NAME
            else:
                weight_name = files[0]
        return Path(hf_hub_download(repo, weight_name, local_files_only=offline))
    except LoraFormatError:
        raise
    except Exception as e:  # hub and network errors become one actionable message
        how = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {e}"
        raise LoraFormatError(label, f"cannot fetch {weight_name or 'the LoRA'} from Hub repo {repo!r} ({how}); "
                                     "download it once with network access, or pass a local path") from e


def resolve_lora_file(source: str | os.PathLike, weight_name: Optional[str] = None, label: str = "") -> Path:
    """The local ``.safetensors`` file ``source`` (file, folder or Hub repo id) names."""
    text = os.fspath(source)
    label = label or text
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise LoraFormatError(label, f"{path} is a pickle file; LoRAs are read from .safetensors only "
                                         "(pickle files can run code when loaded)")
        return path
    if path.is_dir():
        return _pick_in_folder(path, weight_name, label)
    if _REPO_ID.match(text) and not text.startswith(".") and not text.endswith(".safetensors"):
        return _from_hub(text, weight_name, label)
    raise LoraFormatError(label, f"{text} is neither a file, a folder nor a Hugging Face repo id")


def read_lora_file(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, adapter metadata)``; the metadata is diffusers' LoraConfig dict or ``{}``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LoraFormatError(label, f"{path} cannot be read as safetensors ({e}); the file is truncated or "
                                     "corrupt: download it again") from e
    if not tensors:
        raise LoraFormatError(label, f"{path} holds no tensors")
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise LoraFormatError(label, f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({e})") from e
    return tensors, metadata if isinstance(metadata, dict) else {}
