"""LoRA adapters: read every common format, keep several loaded, pick them per request, fuse on demand.

``source``: find and read the file (safetensors only). ``adapter``: the diffusers / PEFT layout and
each layer's scale. ``manager``: a pipeline's adapters (load, unload, fuse, unfuse). ``runtime``: the
per-request selection (a contextvar) and the low-rank side path the shared Linear adds.
Community layouts are converted by the family plugins (``register_lora_formats``).
"""
from .runtime import active_selection, lora_scope

__all__ = ["active_selection", "lora_scope"]
