"""`diffcore serve`: uvicorn around the app; loads the model while /health answers 503; exits 0 on
SIGINT/SIGTERM after in-flight requests finish (under torchrun: 1 once the ranks fell out of step)."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

from .settings import ServeSettings


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the signal it caught after shutting down (exit status 130/143); a server
        that drained cleanly exits 0 instead."""

        state = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self.state is not None:
                if self.state.closing:  # a second signal: stop what runs at its next step, drop what waits
                    self.state.cancel_work()
                self.state.closing = True  # requests on open connections get 503 from now on
            super().handle_exit(sig, frame)

    return Server


def load_generator(model: str, engine_kwargs: dict, loras=()):
    """The model, with the operator's ``--lora`` adapters (LoraFlag records) loaded: unapplied, for requests
    to pick, or fused into the weights for every request when the flag gives a weight."""
    from ..api import DiffGenerator

    gen = DiffGenerator.from_pretrained(model, **engine_kwargs)
    fused = {}
    for flag in loras:
        name = gen.load_lora(flag.path, name=flag.name)
        if flag.weight is not None:
            fused[name] = flag.weight
    if fused:
        gen.fuse_lora(fused)
    return gen


def serve(model: str, settings: ServeSettings, engine_kwargs: dict, log_level: str = "info", loras=()) -> int:
    try:
        import uvicorn
    except ImportError:
        print("error: diffcore serve needs the serve extra: pip install 'diffcore[serve]'", file=sys.stderr)
        return 2
    from . import torchrun
    from .app import create_app

    load = lambda: load_generator(model, engine_kwargs, loras)  # noqa: E731
    leader = None
    if torchrun.layout_world(engine_kwargs) > 1:  # under torchrun: rank 0 serves, the others follow it
        import os

        if int(os.environ.get("RANK", "0")) != 0:
            return torchrun.follow_main(load)
        load = leader = torchrun.LeaderLoader(load)
    from ..errors import ConfigError

    try:
        app = create_app(settings, loader=load, model_name=model)
    except ConfigError as exc:  # the state folder: in use by another server, not writable, too new
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if leader is not None:
            leader.close(loading=False)
        return 2
    state = app.state.diffcore
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(settings.request_timeout) + 1)
    server = _uvicorn_server()(config)
    server.state = state
    if leader is not None:  # the ranks fell out of step: stop (503 meanwhile), exit 1 for torchrun to restart
        leader.on_broken = lambda why: setattr(server, "should_exit", True)

    def announce():
        while not (state.ready.is_set() and server.started):
            if state.load_error or server.should_exit:
                if state.load_error:
                    print(f"error: {state.load_error}", file=sys.stderr, flush=True)
                    server.should_exit = True
                return
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"diffcore serve: {state.model_name} ready at http://{host}:{port}", flush=True)

    threading.Thread(target=announce, name="diffcore-serve-announce", daemon=True).start()
    try:
        server.run()
    finally:
        if leader is not None:
            leader.close(loading=state.loading is not None)  # after the server drained: the other ranks exit
    if leader is not None and leader.broken:
        print(f"error: {leader.broken}", file=sys.stderr, flush=True)
        return 1
    return 2 if state.load_error else 0
