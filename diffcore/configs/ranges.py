"""Sane ranges of numeric parameters, checked up front (docs/api.md, "Numeric ranges").

Why: a finite but absurd value is as bad as NaN: ``guidance_scale=1e308`` overflows the CFG combination
to inf and then NaN (a black picture); ``flow_shift=1e-300`` or ``1e300`` collapses the sigma schedule to
0 or 1 and the scheduler fails on a NaN timestep after the text encoder ran. The bounds leave room far
beyond what real models use (guidance 1-20, flow shift 0.5-20).
"""
from __future__ import annotations

MAX_GUIDANCE = 100.0  # guidance_scale, true_cfg_scale
FLOW_SHIFT = (1e-3, 1e3)  # flow_shift, and a scheduler config's shift / flow_shift
FRAME_RATE = (1, 240)  # fps, LTX-2's frame_rate: 1e-6 fps made LTX-2 size its audio for ~1e8 latent frames


def guidance_problem(value: float):
    """Why a (finite, >= 0) guidance value is refused, or None."""
    if value > MAX_GUIDANCE:
        return f"must be at most {MAX_GUIDANCE:g} (real models use 1-20; larger values overflow), got {value:g}"
    return None


def shift_problem(value: float):
    """Why a (finite, > 0) flow shift is refused, or None."""
    low, high = FLOW_SHIFT
    if not low <= value <= high:
        return (f"must be in [{low:g}, {high:g}] (real models use 0.5-20; beyond, the schedule collapses to "
                f"NaN timesteps), got {value:g}")
    return None


def frame_rate_problem(value: float):
    """Why a (finite, > 0) frame rate is refused, or None."""
    low, high = FRAME_RATE
    if not low <= value <= high:
        return f"must be in [{low}, {high}] frames per second (real videos use 8-60), got {value:g}"
    return None
