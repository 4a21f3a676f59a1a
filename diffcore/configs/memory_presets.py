"""Memory presets: one name per GPU size for the weight placement a big model needs there.

Why: FLUX.2 [dev] is a 32B transformer (64 GB in bf16) beside a 24B Mistral text encoder (48 GB); each GPU
size needs a different mix of quantization and offload, and users should not have to work it out. A preset
only fills EngineArgs fields the user left unset (an explicit ``offload`` / ``quantization`` wins), so
``--memory-preset`` is one flag for ``generate`` and ``serve`` alike (``engine_flags``).

- ``gpu-80gb``: bf16 transformer on the device while it denoises, the text encoder whole while it encodes
  (``offload="model"``: one component at a time; 64 GB peak for FLUX.2 [dev]).
- ``gpu-48gb``: int8 weight-only transformer (~32 GB, resident while denoising), the text encoder streamed
  layer by layer (``offload="text_layers"``: one decoder layer plus embeddings at a time).
- ``gpu-24gb``: transformer and text encoder both streamed block by block (``offload="layers"``): fits, but
  every step copies the whole transformer over PCIe (a Q4 GGUF transformer with ``offload="text_layers"`` is
  the faster 24 GB choice; a preset cannot name that file).
"""
from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError

PRESETS: Mapping[str, Mapping[str, object]] = {
    "gpu-80gb": {"offload": "model"},
    "gpu-48gb": {"quantization": "int8_weight_only", "offload": "text_layers"},
    "gpu-24gb": {"offload": "layers"},
}


def fill(engine) -> dict:
    """The fields ``engine.memory_preset`` sets that ``engine`` leaves unset (None), with the preset's values."""
    if engine.memory_preset is None:
        return {}
    if engine.memory_preset not in PRESETS:
        raise ConfigError(f"unknown memory_preset {engine.memory_preset!r}; accepted: {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[engine.memory_preset].items() if getattr(engine, k) is None}
