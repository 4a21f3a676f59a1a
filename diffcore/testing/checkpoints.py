"""Write tiny Diffusers-format checkpoints from in-memory components, so a plugin's tests load them
through the real loader (``DiffGenerator.from_pretrained(folder)``) exactly as users load real ones.

A Diffusers folder is ``model_index.json`` (the pipeline ``_class_name`` and, per component, the
library and class that build it) plus one subfolder per component:

* diffcore models (``ModelMixin``: transformers, VAEs): ``config.json`` with ``_class_name`` +
  ``diffusion_pytorch_model.safetensors``;
* diffcore schedulers: ``scheduler_config.json``;
* ``transformers`` objects (text encoders, tokenizers, image processors): their ``save_pretrained``.

Example::

    from diffcore.testing.checkpoints import flow_match_scheduler, tiny_autoencoder_kl, tiny_clip, write_checkpoint

    tokenizer, text_encoder = tiny_clip()
    write_checkpoint(tmp_path / "model", "ToyPipeline", {
        "transformer": ToyTransformer2DModel.from_config({...}), "vae": tiny_autoencoder_kl(),
        "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": flow_match_scheduler(),
    })
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = [
    "DIFFUSERS_VERSION",
    "flow_match_scheduler",
    "save_component",
    "tiny_autoencoder_kl",
    "tiny_clip",
    "write_checkpoint",
]

# What model_index.json / config.json record as the writer version; the loader does not read it.
DIFFUSERS_VERSION = "0.42.1"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON-serialisable")


def _is_model(obj) -> bool:
    from diffcore.models.base import ModelMixin

    return isinstance(obj, ModelMixin)


def _is_scheduler(obj) -> bool:
    from diffcore.schedulers.base import SchedulerBase

    return isinstance(obj, SchedulerBase)


def save_component(obj: Any, folder: str | Path) -> list[Optional[str]]:
    """Save one component into ``folder``; returns its ``model_index.json`` entry ``[library, class]``."""
    folder = Path(folder)
    if obj is None:
        return [None, None]
    folder.mkdir(parents=True, exist_ok=True)
    if _is_model(obj):
        from safetensors.torch import save_file

        config = getattr(obj, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError(
                f"{type(obj).__name__} has no config dict: build it with {type(obj).__name__}.from_config({{...}}) "
                "so the checkpoint can record the constructor arguments in config.json"
            )
        class_name = obj.diffusers_class_name or type(obj).__name__
        _write_json(folder / "config.json", {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION,
                                             **dict(config)})
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in obj.state_dict().items()}
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return ["diffusers", class_name]
    if _is_scheduler(obj):
        class_name = obj.diffusers_class_name or type(obj).__name__
        _write_json(folder / "scheduler_config.json", {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION,
                                                       **dict(obj.config)})
        return ["diffusers", class_name]
    if hasattr(obj, "save_pretrained"):  # transformers (or diffusers, in oracle tests) objects
        kwargs = {"safe_serialization": True} if hasattr(obj, "state_dict") else {}
        obj.save_pretrained(str(folder), **kwargs)
        return [type(obj).__module__.split(".")[0], type(obj).__name__]
    raise TypeError(
        f"cannot save a {type(obj).__name__}: expected a diffcore ModelMixin or scheduler, or an object with "
        "save_pretrained (transformers models, tokenizers, image processors)"
    )


def write_checkpoint(folder: str | Path, pipeline_class_name: str, components: Mapping[str, Any], *,
                     extra: Optional[Mapping[str, Any]] = None, name_or_path: Optional[str] = None) -> Path:
    """Write a Diffusers pipeline folder: ``model_index.json`` + one subfolder per component.

    ``components`` maps model_index names (``"transformer"``, ``"vae"``, ...) to objects; ``None``
    records an absent optional component (``[null, null]``). ``extra`` adds pipeline-level keys
    (e.g. ``{"boundary_ratio": 0.875}``); ``name_or_path`` sets ``_name_or_path`` (a Hub id that
    config detectors may match). Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class_name, "_diffusers_version": DIFFUSERS_VERSION}
    if name_or_path is not None:
        index["_name_or_path"] = name_or_path
    for name, obj in components.items():
        index[name] = save_component(obj, folder / name) if obj is not None else [None, None]
    index.update(extra or {})
    _write_json(folder / "model_index.json", index)
    return folder


def tiny_autoencoder_kl(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8, 16),
                        seed: int = 0, perturb: bool = True, **config):
    """A tiny diffcore ``AutoencoderKL`` (``2 ** (len(block_out_channels) - 1)`` x downsampling), perturbed.

    ``config`` overrides any other AutoencoderKL argument (e.g. ``scaling_factor``, ``shift_factor``).
    """
    import torch

    from diffcore.models.autoencoder_kl import AutoencoderKL

    from .weights import perturb_

    n = len(block_out_channels)
    kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                  up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                  scaling_factor=0.6, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    kwargs.update(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(kwargs)
    if perturb:
        perturb_(vae, seed=seed)
    return vae.eval()


def flow_match_scheduler(**config):
    """diffcore's ``FlowMatchEulerDiscreteScheduler`` (defaults: shift 1, no dynamic shifting)."""
    from diffcore.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def tiny_clip(hidden: int = 32, layers: int = 2, seed: int = 0, words=None):
    """``(CLIPTokenizer, CLIPTextModel)``: an offline tiny tokenizer and a perturbed encoder that fit it."""
    from .text_encoders import tiny_clip_text_model
    from .tokenizers import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(words)
    return tokenizer, tiny_clip_text_model(tokenizer, hidden=hidden, layers=layers, projection_dim=hidden, seed=seed)
