"""Run the real HTTP server on 127.0.0.1 (a free port) in a background thread, for tests and benchmarks."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional


@contextlib.contextmanager
def running_server(generator=None, settings=None, loader=None, wait_ready: bool = True,
                   timeout: float = 60.0) -> Iterator[tuple[str, object]]:
    """``with running_server(gen, ServeSettings(...)) as (base_url, app):`` a real uvicorn server; stopped
    (in-flight requests drained, engine shut down) on exit."""
    import uvicorn

    from diffcore.serve.app import create_app
    from diffcore.serve.settings import ServeSettings

    settings = settings or ServeSettings()
    app = create_app(settings, generator=generator, loader=loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="diffcore-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    state = app.state.diffcore
    while wait_ready and not state.ready.is_set() and state.load_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120.0, status: Optional[int] = 200) -> None:
    """Poll ``url`` until it answers ``status`` (for a server started as a subprocess)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if status is None or r.status == status:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer {status} within {timeout:g} s")
        time.sleep(0.1)


def openai_client(base_url: str, api_key: str = "none", **kwargs):
    """The official openai client pointed at a diffcore server (no retries: a 429 must be seen)."""
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)


def decode_image(data: bytes):
    """Encoded image bytes -> (H, W, 3) uint8."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_b64(item):
    """An OpenAI image data item with b64_json -> (H, W, 3) uint8."""
    import base64

    return decode_image(base64.b64decode(item.b64_json))


def png_bytes(image) -> bytes:
    """A PIL image or an (H, W, 3) uint8 array as PNG bytes (for uploads)."""
    import io

    from PIL import Image

    if not hasattr(image, "save"):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def serve_process(*flags: str, timeout: float = 120.0):
    """``diffcore serve FLAGS --port P`` as a child process; returns ``(process, base_url)`` once it prints that
    it is ready (its output is drained in a thread from then on). Raises RuntimeError, with what the process
    printed, when it exits first."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffcore.cli", "serve", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stdout:  # blocks until the server prints; ends if it dies
        lines.append(line)
        if "ready at" in line or time.monotonic() > deadline:
            break
    if not lines or "ready at" not in lines[-1]:
        proc.kill()
        proc.wait()
        raise RuntimeError("diffcore serve did not get ready:\n" + "".join(lines))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
    return proc, f"http://127.0.0.1:{port}"
