"""The server stops abandoned work at the next denoising step (toy model, real socket on 127.0.0.1): a client
that disconnects while its request runs, and a request past --request-timeout. Counted in transformer calls."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.concurrency import count_denoiser_calls, mark_cancels  # noqa: E402
from diffcore.testing.serving import running_server  # noqa: E402

LONG_STEPS = 1000  # far longer than the test waits: only a cancellation ends it in time
NEXT = {"prompt": "the next one", "size": "32x32", "num_inference_steps": 3, "seed": 4}


def _post(base, body: dict, timeout: float):
    return httpx.post(base + "/v1/images/generations", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json"}, timeout=timeout)


def _idle(app, timeout: float = 30.0) -> None:
    runner, deadline = app.state.diffcore.runner, time.monotonic() + timeout
    while runner.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.queue_depth == 0, "the cancelled request still holds the engine"


@pytest.fixture
def calls(toy_gen):
    counted, remove = count_denoiser_calls(toy_gen)
    yield counted
    remove()


def _solo_calls(toy_gen, calls) -> int:
    before = len(calls)
    toy_gen.generate(prompt=NEXT["prompt"], height=32, width=32, num_inference_steps=3, seed=4)
    return len(calls) - before


def _running(app, calls, holder: threading.Thread) -> None:
    deadline = time.monotonic() + 30
    while len(calls) < 4 and time.monotonic() < deadline:  # a few steps in: it runs
        time.sleep(0.01)
    assert holder.is_alive() and len(calls) >= 4


@pytest.mark.parametrize("why", ["disconnect", "timeout"])
def test_an_abandoned_request_stops_at_the_next_step(toy_gen, calls, why):
    next_calls = _solo_calls(toy_gen, calls)
    per_step = 2  # the toy model's CFG: two calls a step
    settings = ServeSettings(served_model_name="toy", request_timeout=1.0 if why == "timeout" else 600.0)
    with running_server(toy_gen, settings) as (base, app):
        marks = mark_cancels(app.state.diffcore.runner, calls)
        long = {"prompt": "a long one", "size": "32x32", "num_inference_steps": LONG_STEPS, "seed": 0}
        answer = {}

        def hold():
            try:
                answer["response"] = _post(base, long, timeout=0.8 if why == "disconnect" else 60)
            except httpx.ReadTimeout:
                answer["response"] = None  # the client left while its request ran

        holder = threading.Thread(target=hold)
        holder.start()
        _running(app, calls, holder)
        holder.join(30)
        _idle(app)
        stopped_at = len(calls)
        response = _post(base, NEXT, timeout=30)
        metrics = httpx.get(base + "/metrics").text
    assert marks, "the server never cancelled the request"
    assert stopped_at - marks[0] <= per_step, f"{stopped_at - marks[0]} calls after the cancellation: over one step"
    assert stopped_at - next_calls < LONG_STEPS * per_step  # it did not run to its end
    assert response.status_code == 200 and len(calls) - stopped_at == next_calls  # its solo work, nothing more
    assert f'diffcore_requests_cancelled_total{{reason="{why}"}} 1.0' in metrics
    if why == "timeout":
        assert answer["response"].status_code == 504 and answer["response"].json()["error"]["code"] == "timeout"
    else:
        assert answer["response"] is None
        assert 'diffcore_requests_total{route="/v1/images/generations",status="499"} 1.0' in metrics


def test_a_second_stop_signal_cancels_running_work_at_the_next_step(toy_gen, calls):
    """The first SIGTERM / SIGINT drains (tests/test_serve_cli.py); a second one stops what runs at its next step."""
    import signal

    import uvicorn

    from diffcore.errors import RequestCancelledError
    from diffcore.serve.server import _uvicorn_server

    with running_server(toy_gen, ServeSettings()) as (base, app):
        state = app.state.diffcore
        server = _uvicorn_server()(uvicorn.Config(app))
        server.state = state
        running = state.runner.submit(toy_gen.request(dict(prompt="long", num_inference_steps=LONG_STEPS)))
        while not calls:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)
        assert state.closing and not running.done()  # the first signal: it runs on
        server.handle_exit(signal.SIGTERM, None)
        with pytest.raises(RequestCancelledError):
            running.result(timeout=60)
    assert len(calls) < 2 * LONG_STEPS
