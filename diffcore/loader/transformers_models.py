"""Load common ``transformers`` text encoders without ``PreTrainedModel.from_pretrained``'s fixed costs.

``from_pretrained`` compiles transformers' whole checkpoint-conversion table (about 1,000 regexes) on
its first call in a process and copies every tensor out of the file; for a diffusion pipeline's text
encoders that is most of the load time. For the classes in ``KEY_RENAMES`` this module does what
``from_pretrained`` does for a plain safetensors checkpoint, in the same order and with transformers'
own helpers: build the model in transformers' init context (meta device, default dtype = the
requested dtype), assign the memory-mapped tensors (dtype: the parameter's as built, or float32 for
the model's keep-in-fp32 modules), tie weights, recompute non-persistent buffers with the model's
``_init_weights``, load the generation config. tests/test_transformers_fast_load.py checks that each
class ends up equal to ``from_pretrained``'s result. Anything else (other classes, pickle weights,
quantized configs, keys that do not match after the class's legacy renames, tied weights saved twice,
DeepSpeed/FSDP setups, transformers < 5) returns ``None`` and the caller uses ``from_pretrained``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from ..errors import WeightMismatchError
from .safetensors_io import assign_weights, check_materialised

# Checkpoint-key renames per class: (old prefix, new prefix, keys with these prefixes left alone),
# applied in order. They are transformers' conversion mapping for these classes: older checkpoints
# keep CLIP's ``text_model.`` prefix and Qwen2.5-VL's pre-v5 layout.
KEY_RENAMES: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "CLIPTextModel": (("text_model.", "", ()),),
    "CLIPVisionModel": (("vision_model.", "", ()),),
    "T5EncoderModel": (),
    "UMT5EncoderModel": (),
    "Qwen2_5_VLForConditionalGeneration": (
        ("visual.", "model.visual.", ()),
        ("model.", "model.language_model.", ("model.language_model.", "model.visual.")),
    ),
    "Qwen3ForCausalLM": (),
    "Qwen3Model": (),  # Z-Image's text encoder (the base model: no lm_head)
    "Mistral3ForConditionalGeneration": (  # the pre-v5 layout kept the language model under language_model.
        ("language_model.model.", "model.language_model.", ()),
        ("language_model.lm_head.", "lm_head.", ()),
        ("vision_tower.", "model.vision_tower.", ()),
        ("multi_modal_projector.", "model.multi_modal_projector.", ()),
    ),
}


def _key_map(class_name: str):
    renames = KEY_RENAMES[class_name]

    def key_map(key: str) -> str:
        for old, new, keep in renames:
            if key.startswith(old) and not key.startswith(keep):
                key = new + key[len(old):]
        return key

    return key_map


def _config(cls: type, path: Path):
    """``cls.config_class.from_pretrained(path)`` without its eager ``logger.info(f"... {config}")``
    (serialising a nested config to JSON: ~20 ms for Qwen2.5-VL); ``None`` where it would warn."""
    config_cls = cls.config_class
    data, _ = config_cls.get_config_dict(path, local_files_only=True)
    if config_cls.base_config_key and config_cls.base_config_key in data:
        data = data[config_cls.base_config_key]
    if data.get("model_type", config_cls.model_type) != config_cls.model_type:
        return None
    return config_cls(**data)


def _dtype_rule(model, dtype: torch.dtype):
    """transformers' rule: the keep-in-fp32 plan's dtype where its pattern matches, else the built tensor's dtype."""
    plan = list(model._get_dtype_plan(dtype).items())
    pattern = re.compile("|".join(f"(?P<g{i}>{k.replace('*', '.*')})" for i, (k, _) in enumerate(plan))) if plan else None

    def rule(name: str, saved: torch.Tensor, expected: torch.Tensor) -> torch.dtype:
        match = pattern.search(name) if pattern is not None else None
        return plan[int(match.lastgroup[1:])][1] if match else expected.dtype

    return rule


def load_fast(cls: type, path: Path, files: Sequence[Path], dtype: torch.dtype | None, device):
    """The model ``cls.from_pretrained(path, dtype=dtype)`` would give, or ``None`` where this path does not apply."""
    if cls.__name__ not in KEY_RENAMES or dtype is None or any(f.suffix != ".safetensors" for f in files):
        return None
    import transformers
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    if int(transformers.__version__.split(".")[0]) < 5 or is_deepspeed_zero3_enabled() or is_fsdp_enabled():
        return None  # the loading steps mirrored here are v5's, single-process ones
    from transformers.initialization import no_init_weights
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers

    config = _config(cls, path)
    if config is None or getattr(config, "quantization_config", None) is not None or getattr(config, "fusion_config", None):
        return None
    config.dtype = dtype
    for key in config.sub_configs:
        if (sub := getattr(config, key)) is not None:
            sub.dtype = dtype
    config.name_or_path = path
    contexts = cls.get_init_context(dtype, False, False, False) + [no_init_weights()]
    with ContextManagers(contexts):
        model = cls(config)
        patch_output_recorders(model)
    tied = model.all_tied_weights_keys
    try:
        absent = assign_weights(model, files, _dtype_rule(model, dtype), key_map=_key_map(cls.__name__),
                                device=device, optional=tied)
    except WeightMismatchError:
        return None  # keys from_pretrained may still know how to convert
    if set(absent) != set(tied):
        return None  # both copies of a tied weight saved: from_pretrained compares them before tying
    _finish(model, device)
    check_materialised(model, files)
    if model.can_generate():
        model.adjust_generation_fn(None, False, None, path, cache_dir=None, force_download=False, proxies=None,
                                   local_files_only=True, token=None, revision=None, subfolder="",
                                   trust_remote_code=None)
    return model.eval()


def _finish(model, device) -> None:
    """from_pretrained's ``_finalize_model_loading`` for a complete checkpoint: tie, then init the unsaved buffers."""
    model.tie_weights(missing_keys=set(model.all_tied_weights_keys), recompute_mapping=False)
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True  # loaded: _init_weights must leave it alone
    for name, buffer in list(model.named_non_persistent_buffers()):
        prefix, _, attr = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        owner._buffers[attr] = torch.empty_like(buffer, device=device)
    model.initialize_weights()
