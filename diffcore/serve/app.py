"""The FastAPI app: server state, the guard middleware (request ids, auth, body cap, metrics), errors."""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from typing import Callable, Optional

from . import origin
from .errors import APIError
from .files import FileStore
from .metrics import Metrics
from .settings import ServeSettings
from .store import StateStore

log = logging.getLogger("diffcore.serve")


class ServerState:
    """Everything the routes share: the loaded generator, the runner in front of it, files, jobs, metrics."""

    def __init__(self, settings: ServeSettings, model_name: Optional[str] = None):
        self.settings = settings
        self.model_name = settings.served_model_name or model_name
        self.generator = None
        self.runner = None
        self.lora_users = None
        self.jobs = None
        self.load_error: Optional[str] = None
        self.closing = False
        self.created = int(time.time())
        self.metrics = Metrics()
        self.store = StateStore(settings.state_dir)  # the lock: a second server on this folder stops here
        self.files = FileStore(self.store, settings.file_ttl)
        self.store.remove_orphans()
        self.files.sweep()
        self._stop_sweeper = threading.Event()
        self.ready = threading.Event()
        self.loading: Optional[threading.Thread] = None  # the loader's thread, once started

    def attach(self, generator) -> None:
        """Start serving ``generator``: the runner (batching scheduler) and the video job table."""
        from .jobs import VideoJobs
        from .loras import AdapterUsers
        from .videos import ENCODERS

        s = self.settings
        self.model_name = self.model_name or str(generator.model)
        runner = generator.make_runner(max_batch_size=s.max_batch_size, max_wait_ms=s.batch_wait_ms,
                                       max_queue=s.max_queue, step_batching=s.step_batching)
        runner.on_batch = self.metrics.batch_size.observe
        self.metrics.queue_depth.set_function(lambda: runner.queue_depth)
        self.lora_users = AdapterUsers(runner)  # DELETE /v1/loras/NAME answers 409 while requests use it
        self.generator, self.runner = generator, runner
        self.jobs = VideoJobs(runner, self.files, self.store, self.model_name, s.max_jobs, s.file_ttl, ENCODERS,
                              self.step_timer())
        threading.Thread(target=self._sweep_loop, name="diffcore-serve-sweeper", daemon=True).start()
        self.ready.set()

    def _sweep_loop(self) -> None:
        """Delete expired files and jobs every so often (lookups also skip what has expired)."""
        period = min(60.0, max(self.settings.file_ttl / 4, 0.5))
        while not self._stop_sweeper.wait(period):
            try:
                self.jobs.sweep()
                self.files.sweep()
            except Exception:  # noqa: BLE001 (a failed sweep is retried next period; serving goes on)
                log.exception("sweeping expired files failed")

    @property
    def model_names(self) -> tuple:
        """The names a request's ``model`` may give: the served name, then what --model named."""
        path = str(getattr(self.generator, "model", None) or self.model_name)
        return (self.model_name,) if path == self.model_name else (self.model_name, path)

    def load(self, loader: Callable[[], object]) -> None:
        """Load in this thread (the server answers 503 meanwhile); a failure is kept for /health."""
        try:
            self.attach(loader())
        except Exception as exc:
            log.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"

    def require_ready(self) -> None:
        broken = self.generator.broken if self.generator is not None else None  # ranks that fell out of step
        if broken:
            raise APIError(503, f"the server is stopping for a restart: {broken}", type="server_error",
                           code="out_of_step")
        if self.closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.ready.is_set():
            why = f"loading the model failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, type="server_error", code="loading", headers={"Retry-After": "5"})

    def step_timer(self) -> Callable[[int, int], None]:
        """An on_step callback that records the time between a request's consecutive denoising steps."""
        last = [None]

        def on_step(step: int, steps: int) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                self.metrics.step_latency.observe(now - last[0])
            last[0] = now

        return on_step

    def cancel_work(self) -> None:
        """Stop everything the engine holds: waiting requests are cancelled, running ones stop at their next
        denoising step (a second SIGTERM / SIGINT; the first drains)."""
        if self.runner is not None:
            self.runner.shutdown(wait=False, cancel=True)

    def close(self) -> None:
        """Stop taking work, finish what the engine holds (its videos are written), release the state folder.
        Finished content stays in the folder for the next server (a temporary folder is deleted)."""
        self.closing = True
        self._stop_sweeper.set()
        if self.runner is not None:
            self.runner.shutdown(wait=True)
        if self.jobs is not None:
            self.jobs.close()
        self.store.close()


def _json(status: int, body: dict, headers: dict) -> tuple[dict, bytes]:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, data


class Guard:
    """Pure ASGI middleware around the whole app (pure, so waiting requests still see client disconnects).

    Gives every request an id (``x-request-id``), checks the API key on /v1 and /metrics, reads the body
    up to the cap (413 past it), counts requests by route and status, and turns an unexpected exception
    into a logged 500 that carries the request id.
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.settings.api_key
        self.key = None if key is None else f"Bearer {key}".encode()
        self.hosts = origin.allowed_hosts(state.settings)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        start, status, started = time.perf_counter(), [500], [False]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        async def reply(error: APIError):
            start_msg, data = _json(error.status, error.body(request_id), error.headers)
            await send_wrapped(start_msg)
            await send({"type": "http.response.body", "body": data})

        try:
            error = self._refuse(scope)
            if error is None:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await reply(error)
            else:
                try:
                    await self.app(scope, receive, send_wrapped)
                except Exception:
                    log.exception("internal error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
                    status[0] = 500
                    if not started[0]:
                        await reply(APIError(500, f"internal server error (request id {request_id})",
                                             type="server_error", code="internal_error"))
        finally:
            route = getattr(scope.get("route"), "path", None) or ("/v1/*" if scope["path"].startswith("/v1/") else "other")
            self.state.metrics.requests.labels(route, str(status[0])).inc()
            self.state.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _websocket(self, scope, receive, send):
        """A WebSocket handshake: the Host / Origin rules, and a wrong API key refused; without a key in the
        headers the route asks for it in the first message (``websocket_authorized``: serve.realtime)."""
        error = origin.refuse(scope, self.state.settings, self.hosts)
        given = dict(scope["headers"]).get(b"authorization")
        if error is None and self.key is not None and given is not None and not hmac.compare_digest(given, self.key):
            error = APIError(401, "incorrect API key", code="invalid_api_key")
        scope.setdefault("state", {})["websocket_authorized"] = self.key is None or given is not None
        if error is None:
            return await self.app(scope, receive, send)
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):  # the refusal as an HTTP answer
            start, data = _json(error.status, error.body(), error.headers)
            await send({**start, "type": "websocket.http.response.start"})
            await send({"type": "websocket.http.response.body", "body": data})
        else:
            await send({"type": "websocket.close", "code": 1008})  # the server answers 403

    def _refuse(self, scope) -> Optional[APIError]:
        error = origin.refuse(scope, self.state.settings, self.hosts)  # other web sites (docs/serve.md)
        if error is not None:
            return error
        path = scope["path"]
        if self.key is None or scope["method"] == "OPTIONS" or not (path.startswith("/v1") or path == "/metrics"):
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.key):
            return None
        why = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
        return APIError(401, why, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        """Buffer the body up to the cap, then replay it; later receives reach the client (disconnects)."""
        limit = self.state.settings.max_body_bytes
        too_big = APIError(413, f"request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                           code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, APIError(400, "the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay, None


def create_app(settings: Optional[ServeSettings] = None, generator=None, loader: Optional[Callable] = None,
               model_name: Optional[str] = None):
    """The ASGI app. Give a loaded ``generator``, or a ``loader`` run in a thread at startup (the server
    answers /health with 503 until it returns)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from . import chat, loras, realtime, routes, videos

    settings = settings or ServeSettings()
    state = ServerState(settings, model_name)
    if generator is not None:
        state.attach(generator)

    @asynccontextmanager
    async def lifespan(app):
        if loader is not None and generator is None:
            thread = threading.Thread(target=state.load, args=(loader,), name="diffcore-serve-load", daemon=True)
            thread.start()
            state.loading = thread  # before shutdown can begin: whoever waits for the loader knows it will run
        yield
        import anyio

        await anyio.to_thread.run_sync(state.close)

    app = FastAPI(title="diffcore", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.diffcore = state

    def request_id(request) -> Optional[str]:
        return request.scope.get("state", {}).get("request_id")

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(request_id(request)), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.body(request_id(request)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        error = APIError(400, first.get("msg", "invalid request"), param=param, code="invalid_value")
        return JSONResponse(error.body(request_id(request)), status_code=400)

    app.include_router(routes.router)
    app.include_router(videos.router)
    app.include_router(loras.router)
    app.include_router(chat.router)
    app.include_router(realtime.router)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(Guard, state=state)
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    else:
        app.add_middleware(Guard, state=state)
    return app
