"""Replicas of ``diffcore serve`` on Ray Serve (the ``diffcore[ray]`` extra).

Each replica is a Ray actor running the ordinary diffcore server app (OpenAI Images/Videos routes,
its own DiffGenerator and batching runner); Ray Serve's HTTP proxy routes requests across replicas
and restarts a replica whose health check fails. diffcore adds no cluster management of its own.

    diffcore serve --model M --replicas 2 --ray-address local      # start a local Ray, serve on --port
    diffcore serve --model M --replicas 4 --ray-address auto       # join the running Ray cluster
    serve run diffcore.serve.ray:app_builder model=M replicas=2    # Ray's own CLI (config files, k8s)

Every response carries ``x-diffcore-replica`` (the Ray replica id) so clients and tests can see the
routing. See docs/scale.md for the cluster recipe and for combining replicas with SP/CFG parallelism.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from .settings import ServeSettings

REPLICA_HEADER = "x-diffcore-replica"


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001  (outside a replica: tests of the app itself)
        import os

        return f"pid-{os.getpid()}"


class _ReplicaHeader:
    """ASGI middleware: name the replica that answered."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)])
            await send(message)

        return await self.app(scope, receive, tagged)


def deployment(model: str, settings: Optional[ServeSettings] = None, engine_kwargs: Optional[dict] = None,
               replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
               max_ongoing_requests: Optional[int] = None, loras=()):
    """The Ray Serve application: ``replicas`` copies of the diffcore app, each loading ``model``.

    The model loads in the replica's constructor (a replica is ready only once it can answer).
    ``max_ongoing_requests`` (default: the server's ``max_batch_size``) is how many requests Ray hands
    one replica at a time; more wait in Ray's router for a free replica, so load spreads.
    """
    from ray import serve

    import attrs

    # each replica keeps its jobs and files in a temporary folder of its own (one state folder, one server)
    settings = attrs.evolve(settings or ServeSettings(), state_dir=None)
    engine_kwargs = dict(engine_kwargs or {})

    loras = list(loras)

    def build_app():
        from .app import create_app
        from .server import load_generator

        app = create_app(settings, generator=load_generator(model, engine_kwargs, loras), model_name=model)
        app.add_middleware(_ReplicaHeader, replica=_replica_id())
        return app

    @serve.deployment(name="diffcore", num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                      health_check_period_s=10,
                      max_ongoing_requests=max_ongoing_requests or settings.max_batch_size)
    @serve.ingress(build_app)
    class DiffcoreReplica:
        """One diffcore server; Ray restarts it when the actor dies or the health check fails."""

    return DiffcoreReplica.bind()


def app_builder(args: dict):
    """For ``serve run diffcore.serve.ray:app_builder model=M replicas=N [cpus=1] [gpus=0] [dtype=...]``."""
    engine = {k: args[k] for k in ("dtype", "device", "cache") if k in args}
    return deployment(args["model"], ServeSettings(), engine, replicas=int(args.get("replicas", 1)),
                      cpus_per_replica=float(args.get("cpus", 1)), gpus_per_replica=float(args.get("gpus", 0)))


def run(model: str, settings: ServeSettings, engine_kwargs: dict, replicas: int, address: str = "local",
        cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0, max_ongoing_requests: Optional[int] = None,
        loras=(), block: bool = True) -> str:
    """Start (``address="local"``) or join (``"auto"`` or ``ray://...``) a Ray cluster, deploy the
    replicas behind Ray Serve's proxy on ``settings.host:settings.port``; returns the base URL.

    With ``block`` it waits until SIGINT/SIGTERM, then shuts the application down.
    """
    import ray
    from ray import serve

    ray.init(address=None if address == "local" else address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(model, settings, engine_kwargs, replicas, cpus_per_replica, gpus_per_replica,
                         max_ongoing_requests, loras), name="diffcore", route_prefix="/")
    url = f"http://{settings.host}:{settings.port}"
    print(f"diffcore serve: {model} ready at {url} ({replicas} Ray Serve replicas)", flush=True)
    if not block:
        return url
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("diffcore")
        if address == "local":
            serve.shutdown()
            ray.shutdown()
    return url


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `diffcore serve --replicas N` or `serve run diffcore.serve.ray:app_builder model=M`")
