"""FLUX.2 transformer variants ([dev], [klein] 4B / 9B) from a config or from a weight file's shapes.

Why: the BFL single files (``flux2-dev.safetensors``, ``flux-2-klein-4b.safetensors``, ...) share one key
layout, so a file of one variant given to another variant's folder fails as a plain key / shape mismatch.
Naming both variants (geometry from ``models-2026.md`` 1.3) tells the user which file or folder to swap.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

# (hidden, double blocks, single blocks, text features, guidance embedding) -> name (BFL / diffusers configs)
KNOWN = {(6144, 8, 48, 15360, True): "FLUX.2 [dev]", (4096, 8, 24, 12288, False): "FLUX.2 [klein] 9B",
         (3072, 5, 20, 7680, False): "FLUX.2 [klein] 4B"}


def describe(hidden: int, double: int, single: int, text: int, guidance: bool) -> str:
    name = KNOWN.get((hidden, double, single, text, guidance))
    if name is None:  # other sizes (tests, community distillations): say which family it is like
        name = ("a FLUX.2 [dev]-style transformer (guidance embedding)" if guidance
                else "a FLUX.2 [klein]-style transformer (no guidance embedding)")
    return f"{name}, hidden {hidden}, {double} double + {single} single blocks, text features {text}"


def of_config(config: Mapping) -> str:
    heads, head_dim = config.get("num_attention_heads", 48), config.get("attention_head_dim", 128)
    return describe(heads * head_dim, config.get("num_layers", 8), config.get("num_single_layers", 48),
                    config.get("joint_attention_dim", 15360), bool(config.get("guidance_embeds", True)))


def _count(shapes: Mapping[str, tuple], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def of_weights(shapes: Mapping[str, tuple]) -> Optional[str]:
    """From Diffusers-named shapes (the loader converts BFL files first); None without the embedders."""
    x, ctx = shapes.get("x_embedder.weight"), shapes.get("context_embedder.weight")
    if x is None or ctx is None or len(x) != 2 or len(ctx) != 2:
        return None
    guidance = any(k.startswith("time_guidance_embed.guidance_embedder.") for k in shapes)
    return describe(x[0], _count(shapes, "transformer_blocks"), _count(shapes, "single_transformer_blocks"), ctx[1],
                    guidance)
