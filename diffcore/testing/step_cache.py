"""Run a pipeline under a step-cache policy and count how often its transformer really ran.

Shared by the plugins' cache tests: a policy that claims to skip calls must also not run the body.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from torch import nn

from diffcore.cache import supports_step_cache


def generate_with_step_cache(folder, policy: str, threshold: float, params: dict,
                             last_block: Callable[[nn.Module], nn.Module]) -> tuple[np.ndarray, dict, int]:
    """``(latents, the policy's stats, how many calls ran the last block)`` for one fp32 generation."""
    from diffcore import DiffGenerator

    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, cache=policy,
                                        cache_threshold=threshold)
    model = gen.components["transformer"]
    assert supports_step_cache(model), f"{type(model).__name__} does not implement the block-cache protocol"
    body_runs = []  # the last block runs only when the cache did not skip the call
    handle = last_block(model).register_forward_hook(lambda *a: body_runs.append(1))
    try:
        result = gen.generate(**params)
    finally:
        handle.remove()
    assert result.cache_stats is not None, f"EngineArgs(cache={policy!r}) built no step cache for the request"
    return result.latents.numpy(), result.cache_stats, len(body_runs)
