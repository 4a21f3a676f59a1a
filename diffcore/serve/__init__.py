"""`diffcore serve`: the OpenAI Images and Videos APIs, metrics and a playground over one loaded model.

A thin adapter over the engine's scheduler: ``app`` (state, middleware, errors), ``routes`` (images,
models, files, health, playground), ``videos`` (jobs API), ``schemas`` (OpenAI bodies <-> generate()
keywords), ``jobs``, ``files``, ``metrics``, ``runner``, ``server`` (uvicorn, signals). Needs the
``diffcore[serve]`` extra (FastAPI, uvicorn, python-multipart, prometheus-client).
"""
from .settings import ServeSettings


def create_app(*args, **kwargs):
    """See :func:`diffcore.serve.app.create_app` (imported on use: FastAPI only when serving)."""
    from .app import create_app as make

    return make(*args, **kwargs)


__all__ = ["ServeSettings", "create_app"]
