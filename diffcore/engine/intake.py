"""The one way in: generate() keyword arguments -> a validated Request.

Every entry point converts here, once: ``generate``, ``generate_batch``, the server (when a request
arrives, before it is queued), the batching scheduler (a dict submitted from Python) and the torchrun
leader and its followers. The keywords become SamplingParams (unknown names and bad values are refused),
the functions among them (``callback``, ``block_callback``) stay with the caller, and the pipeline's
input validation runs (sizes resolved, images decoded, the engine's budget and the adapters checked).
What comes out is queued and run as it is: nothing parses or validates it again.
"""
from __future__ import annotations

import torch

from ..configs.sampling_params import SamplingParams
from ..errors import SamplingParamError
from ..request import Request

LOCAL_ONLY = ("callback", "block_callback")  # functions: they stay in this process (progress, streaming)


def params_class(pipeline, params_cls: type[SamplingParams], kwargs: dict) -> type[SamplingParams]:
    """The SamplingParams class of the composition (task) these keywords ask for (diffcore.tasks): the model's
    own ``params_cls``, or it plus ``strength`` / ``mask``; SamplingParamError where there is no such one."""
    from ..tasks import params_for

    return params_for(kwargs, params_cls, pipeline.compositions, pipeline.pipeline_name)


def params_from(pipeline, params_cls: type[SamplingParams], kwargs: dict) -> SamplingParams:
    """The validated SamplingParams of generate() keywords, of the composition they ask for (``image`` +
    ``strength``: img2img; ``mask``: inpainting): SamplingParamError names a bad one."""
    return params_class(pipeline, params_cls, kwargs).from_user(**kwargs)


def new_request(pipeline, params: SamplingParams, callback=None, block_callback=None) -> Request:
    """A fresh Request for ``params``: its own generator (seeded on the CPU), its own state; not validated."""
    for name, fn in (("callback", callback), ("block_callback", block_callback)):
        if fn is not None and not callable(fn):
            raise SamplingParamError(name, f"expected a function, got {type(fn).__name__}")
    prompts = params.prompts
    return Request(params=params, prompts=prompts, batch_size=len(prompts),
                   device=torch.device(pipeline.engine_args.device),
                   generator=torch.Generator("cpu").manual_seed(params.seed), callback=callback,
                   block_callback=block_callback)


def request_from(pipeline, params_cls: type[SamplingParams], kwargs: dict) -> Request:
    """generate() keywords -> a Request that passed the pipeline's input validation, ready to run."""
    kwargs = dict(kwargs)
    local = {name: kwargs.pop(name, None) for name in LOCAL_ONLY}
    return pipeline.validate(new_request(pipeline, params_from(pipeline, params_cls, kwargs), **local))


def portable(req: Request) -> dict:
    """The keywords that rebuild ``req`` in another process (its set parameters; functions stay here)."""
    params = req.params
    values = ((name, getattr(params, name)) for name in type(params).parameter_names())
    return {name: value for name, value in values if value is not None}
