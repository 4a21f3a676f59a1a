"""Conformance checks every diffcore pipeline should pass, for plugin authors' tests.

Each check raises ``AssertionError`` with a message that says what is wrong (so it reads well in
pytest and works outside it) and returns what it computed, for further assertions::

    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    check_dataflow(gen)
    check_output(gen, height=32, width=48, prompt="a cat", num_inference_steps=2)
    check_determinism(gen, prompt="a cat", height=32, width=32, num_inference_steps=2)
    check_bad_params(gen, prompt="a cat")
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["check_bad_params", "check_dataflow", "check_determinism", "check_output"]


def _np(gen, **params) -> np.ndarray:
    params.setdefault("prompt", "a red circle")
    out = gen.generate(**{**params, "output_type": "np"}).output
    if out is None:
        raise AssertionError("generate(output_type='np') returned no output")
    return out


def check_determinism(gen, seed: int = 0, **params) -> np.ndarray:
    """Same seed => bitwise identical output; seed + 1 => a different one. Returns the first output."""
    first = _np(gen, seed=seed, **params)
    again = _np(gen, seed=seed, **params)
    if first.shape != again.shape or not np.array_equal(first, again):
        diff = float(np.abs(first - again).max()) if first.shape == again.shape else float("nan")
        raise AssertionError(f"seed={seed} twice gave different outputs (max|diff|={diff:.3g}): some state leaks "
                             "between requests, or noise is drawn without the request's generator")
    other = _np(gen, seed=seed + 1, **params)
    if np.allclose(first, other, atol=1e-6, rtol=0):
        raise AssertionError(f"seeds {seed} and {seed + 1} gave the same output: the seed does not reach the noise")
    return first


def check_output(gen, height: int, width: int, num_frames: Optional[int] = None, **params):
    """Output is float32 in [0, 1], shaped (B, H, W, 3) -- (B, F, H, W, 3) for video -- not constant, and
    every stage ran (has a timing). Also checks the PIL view has the requested size. Returns the result."""
    params.setdefault("prompt", "a red circle")
    if num_frames is not None:
        params["num_frames"] = num_frames
    result = gen.generate(height=height, width=width, **{**params, "output_type": "np"})
    out = result.output
    batch = 1 if isinstance(params["prompt"], str) else len(params["prompt"])
    if gen.config.is_video:
        frames = num_frames if num_frames is not None else out.shape[1] if out is not None and out.ndim == 5 else None
        want = (batch, frames, height, width, 3)
    else:
        want = (batch, height, width, 3)
    if out is None or tuple(out.shape) != want:
        raise AssertionError(f"output shape {None if out is None else tuple(out.shape)}, expected {want}")
    if out.dtype != np.float32:
        raise AssertionError(f"output dtype {out.dtype}, expected float32")
    if not np.isfinite(out).all():
        raise AssertionError("output has NaN or inf values")
    if out.min() < 0 or out.max() > 1:
        raise AssertionError(f"output range [{out.min():.3g}, {out.max():.3g}] is outside [0, 1]")
    if float(out.std()) == 0.0:
        raise AssertionError(f"output is constant ({float(out.flat[0]):.3g}): nothing reached the decoder")
    if result.images[0].size != (width, height):
        raise AssertionError(f"result.images[0].size={result.images[0].size}, expected (width, height)={(width, height)}")
    missing = [s.name for s in gen.pipeline.stages if s.name not in result.timings]
    if missing:
        raise AssertionError(f"stages {missing} did not run (no timing recorded)")
    return result


# (parameter, bad value): each must raise SamplingParamError naming the parameter, before any compute.
BAD_PARAMS: tuple[tuple[str, Any], ...] = (
    ("num_inference_steps", 0),
    ("num_inference_steps", 2.5),
    ("height", "64"),
    ("width", -8),
    ("guidance_scale", -1.0),
    ("seed", "0"),
    ("output_type", "jpeg"),
    ("prompt", 123),
    ("not_a_parameter", 1),
)


def check_bad_params(gen, cases=BAD_PARAMS, **valid) -> list[str]:
    """Each bad value in ``cases`` raises ``SamplingParamError`` whose ``param`` and message name the
    parameter, before the pipeline runs. ``valid`` are otherwise-valid parameters (e.g. an ``image``
    for editing models). Returns the error messages."""
    from diffcore.errors import SamplingParamError

    valid.setdefault("prompt", "a red circle")
    pipeline, calls = gen.pipeline, []
    original = pipeline.forward
    pipeline.forward = lambda req: calls.append(req) or original(req)  # instance attribute: restored below
    messages = []
    try:
        for name, value in cases:
            try:
                gen.generate(**{**valid, name: value})
            except SamplingParamError as exc:
                if exc.param != name or repr(name) not in str(exc):
                    raise AssertionError(f"{name}={value!r} raised an error about {exc.param!r}: {exc}") from exc
                messages.append(str(exc))
            except Exception as exc:
                raise AssertionError(f"{name}={value!r} raised {type(exc).__name__} instead of SamplingParamError: "
                                     f"{exc}") from exc
            else:
                raise AssertionError(f"{name}={value!r} was accepted; expected SamplingParamError")
            if calls:
                raise AssertionError(f"{name}={value!r}: the pipeline ran before the parameter was rejected")
    finally:
        del pipeline.forward
    return messages


class _Placeholder:
    """Stands in for a component when a pipeline class is checked without loading weights."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<placeholder {self.name}>"


def _pipeline(target, config, components):
    from diffcore.pipeline import ComposedPipelineBase

    if hasattr(target, "pipeline") and isinstance(target.pipeline, ComposedPipelineBase):  # a DiffGenerator
        return target.pipeline
    if isinstance(target, ComposedPipelineBase):
        return target
    if isinstance(target, type) and issubclass(target, ComposedPipelineBase):
        from diffcore.configs import PipelineConfig

        if components is None:
            names = (*target._required_config_modules, *getattr(config, "optional_components", ()))
            components = {n: _Placeholder(n) for n in names}
        try:
            return target(components, config if config is not None else PipelineConfig())
        except AttributeError as exc:
            raise AssertionError(f"{target.__name__} cannot be built from placeholder components ({exc}); pass a "
                                 "loaded DiffGenerator instead") from exc
    raise TypeError(f"expected a DiffGenerator, a pipeline or a ComposedPipelineBase subclass, got {target!r}")


def check_dataflow(target, config=None, components=None) -> list[str]:
    """The build-time dataflow proof passes, stage names are unique, every declared field is a Request
    field, and some stage produces ``output``. ``target``: a DiffGenerator, a pipeline instance, or a
    pipeline class (built with ``config`` and placeholder components). Returns the stage names."""
    import attrs

    from diffcore.request import Request

    pipeline = _pipeline(target, config, components)
    names = [s.name for s in pipeline.stages]
    if not names:
        raise AssertionError(f"{type(pipeline).__name__} has no stages")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AssertionError(f"duplicate stage names {dupes}")
    pipeline.check_dataflow()  # raises PipelineDataflowError naming the stage and field
    fields = {f.name for f in attrs.fields(Request)}
    for stage in pipeline.stages:
        for field in (*stage.inputs, *stage.outputs):
            if field.name not in fields:
                raise AssertionError(f"stage {stage.name!r} declares {field.name!r}, which is not a Request field "
                                     f"(keep plugin-specific state in req.extra)")
    if not any(f.name == "output" for s in pipeline.stages for f in s.outputs):
        raise AssertionError(f"no stage of {type(pipeline).__name__} produces 'output' (add a DecodingStage)")
    return names
