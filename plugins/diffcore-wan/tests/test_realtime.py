"""Real-time video of the tiny self-forcing Wan over WebSocket /v1/realtime/video, with a real client library
over a real socket (127.0.0.1): blocks arrive while later ones are still being computed, the raw blocks
joined equal generate()'s frames, a prompt change changes only the blocks after it, closing the socket
cancels the generation at its next step, and the server then answers identically (issue 28 item 4)."""
from __future__ import annotations

import json
import threading
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
ws_client = pytest.importorskip("websockets.sync.client", reason="the serve extra's websockets is not installed")

from websockets.exceptions import ConnectionClosed  # noqa: E402

from diffcore.outputs import to_uint8  # noqa: E402
from diffcore.serve import realtime  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.stages import CausalDMDDenoisingStage  # noqa: E402
from diffcore.testing.serving import running_server  # noqa: E402
from wan_testlib import ours  # noqa: E402

START = {"type": "start", "prompt": "a red cat", "num_frames": 21, "seed": 2, "size": "48x32"}  # 3 blocks
KW = dict(num_frames=21, seed=2, height=32, width=48, output_type="np")
WAIT = 60  # seconds: a bound, never reached when things work


def frames_of(gen, prompt: str) -> np.ndarray:
    return to_uint8(gen.generate(prompt=prompt, **KW).output[0])


def read_until_done(ws) -> tuple[list, list, dict]:
    """(blocks as (header, data), the other messages, the done message)."""
    blocks, others = [], []
    while True:
        message = json.loads(ws.recv(timeout=WAIT))
        if message["type"] == "block":
            blocks.append((message, ws.recv(timeout=WAIT)))
        elif message["type"] == "done":
            return blocks, others, message
        else:
            assert message["type"] != "error", message
            others.append(message)


def rgb(blocks) -> list[np.ndarray]:
    return [np.frombuffer(data, np.uint8).reshape(h["num_frames"], h["height"], h["width"], 3) for h, data in blocks]


class Gate:
    """Holds the causal stage before it denoises block ``block`` until ``release`` is set; records the blocks
    whose denoising started and finished."""

    def __init__(self, gen, block: int, release: threading.Event):
        self.stage = next(s for s in gen.pipeline.stages if isinstance(s, CausalDMDDenoisingStage))
        self.block, self.release = block, release
        self.started, self.finished = [], []
        self.waiting = threading.Event()
        real = self.stage.denoise

        def denoise(*args, branch, **kwargs):
            b = int(branch.removeprefix("block"))
            self.started.append(b)
            if b == self.block:
                self.waiting.set()
                assert self.release.wait(WAIT), "the gate was never released"
            out = real(*args, branch=branch, **kwargs)
            self.finished.append(b)
            return out

        self.patch = mock.patch.object(self.stage, "denoise", denoise)

    def __enter__(self):
        self.patch.start()
        return self

    def __exit__(self, *exc):
        self.patch.stop()


@pytest.fixture(scope="module")
def causal(fewstep_folders):
    return ours(fewstep_folders["causal"])


@pytest.fixture(scope="module")
def server(causal):
    with running_server(causal, ServeSettings(served_model_name="self-forcing")) as (base, app):
        yield base.replace("http://", "ws://") + "/v1/realtime/video", app


def test_rgb24_blocks_stream_before_the_last_is_computed_and_equal_generate(server, causal):
    url, _ = server
    want = frames_of(causal, "a red cat")
    release = threading.Event()
    with Gate(causal, 2, release) as gate, ws_client.connect(url, open_timeout=WAIT) as ws:
        ws.send(json.dumps({**START, "format": "rgb24"}))
        started = json.loads(ws.recv(timeout=WAIT))
        assert started["type"] == "started" and (started["seed"], started["fps"], started["format"]) == (2, 16, "rgb24")
        early = [(json.loads(ws.recv(timeout=WAIT)), ws.recv(timeout=WAIT)) for _ in range(2)]
        assert gate.waiting.wait(WAIT) and 2 not in gate.finished  # blocks 0 and 1 arrived; block 2 is not computed
        release.set()
        rest, others, done = read_until_done(ws)
        ws.send(json.dumps({"type": "prompt", "prompt": "too late"}))  # the generation has finished
        error = json.loads(ws.recv(timeout=WAIT))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WAIT)
    blocks = early + rest
    assert [h["index"] for h, _ in blocks] == [0, 1, 2] and [h["num_frames"] for h, _ in blocks] == [5, 8, 8]
    assert all((h["width"], h["height"]) == (48, 32) for h, _ in blocks) and others == []
    assert np.array_equal(np.concatenate(rgb(blocks)), want)  # bit for bit generate()'s frames
    assert done == {"type": "done", "num_frames": 21, "prompts": [{"from_block": 0, "prompt": "a red cat"}]}
    assert error["type"] == "error" and error["error"]["code"] == "no_generation" and "finished" in error["error"]["message"]
    assert closed.value.rcvd.code == 1008


def switched(gen, first: str, second: str, at: int) -> tuple[np.ndarray, dict]:
    """generate() with ``second`` swapped in for the blocks from ``at`` on (its condition made by the pipeline's
    own stages up to the causal stage): (frames, {block: latents})."""
    stop = next(i for i, s in enumerate(gen.pipeline.stages) if isinstance(s, CausalDMDDenoisingStage))
    latents = {}

    def on_block(b, block_latents, frames):
        latents[b] = block_latents.clone()
        if b == at - 1:
            twin = gen.request({**KW, "prompt": second})
            while twin.stages_done < stop:
                twin = gen.pipeline.stages[twin.stages_done](twin)
                twin.stages_done += 1
            req.condition["cond"] = twin.condition["cond"]

    req = gen.request({**KW, "prompt": first, "block_callback": on_block})
    result, = gen.run_requests([req])
    return to_uint8(result.output[0]), latents


def test_prompt_change_applies_from_the_next_block_only(server, causal):
    url, _ = server
    before, want = frames_of(causal, "a red cat"), switched(causal, "a red cat", "a blue dog", 2)[0]
    read = threading.Event()
    real_change = realtime.Generation.change_prompt

    def change(self, prompt):
        real_change(self, prompt)
        read.set()

    # block 1 is held until the server has read the prompt change: it applies from block 2, deterministically
    with mock.patch.object(realtime.Generation, "change_prompt", change), Gate(causal, 1, read), \
            ws_client.connect(url, open_timeout=WAIT) as ws:
        ws.send(json.dumps({**START, "format": "rgb24"}))
        assert json.loads(ws.recv(timeout=WAIT))["type"] == "started"
        first = (json.loads(ws.recv(timeout=WAIT)), ws.recv(timeout=WAIT))
        ws.send(json.dumps({"type": "prompt", "prompt": "a blue dog"}))
        rest, others, done = read_until_done(ws)
        ws.send(json.dumps({**START, "format": "rgb24"}))  # the same socket runs the next generation
        again, _, _ = read_until_done(ws)
    got = rgb([first, *rest])
    assert others == [{"type": "prompt", "prompt": "a blue dog", "from_block": 2}]
    assert done["prompts"] == [{"from_block": 0, "prompt": "a red cat"}, {"from_block": 2, "prompt": "a blue dog"}]
    assert np.array_equal(np.concatenate(got[:2]), before[:13])  # blocks 0 and 1: the first prompt, unchanged
    assert not np.array_equal(got[2], before[13:])  # block 2 changed ...
    assert np.array_equal(np.concatenate(got), want)  # ... to the new prompt's, continuing the first one's past
    assert np.array_equal(np.concatenate(rgb(again)), before)  # a new start begins with its own prompt


def test_a_switched_block_is_the_new_prompts_block(causal):
    """What the swap does to the latents: block 2 after a switch is near the new prompt's own block 2 and far
    from the old prompt's (the tiny random model heeds its prompt only a little, hence the ratio)."""
    _, cat = switched(causal, "a red cat", "a red cat", 3)  # never switched
    _, dog = switched(causal, "a blue dog", "a blue dog", 3)
    _, both = switched(causal, "a red cat", "a blue dog", 2)
    assert all(np.array_equal(both[b], cat[b]) for b in (0, 1))
    to_cat, to_dog = (both[2] - cat[2]).abs().mean().item(), (both[2] - dog[2]).abs().mean().item()
    assert to_dog * 5 < to_cat, (to_dog, to_cat)


def test_closing_the_socket_cancels_at_the_next_step_and_the_server_answers_identically(server, causal):
    url, app = server
    state = app.state.diffcore
    cancelled = threading.Event()
    real_cancel = realtime.Generation.cancel

    def cancel(self, reason):
        real_cancel(self, reason)
        cancelled.set()

    steps = []
    real_predict = CausalDMDDenoisingStage.predict

    def predict(self, *args, **kwargs):
        steps.append(1)
        return real_predict(self, *args, **kwargs)

    counted = state.metrics.cancelled.labels("disconnect")._value.get()
    with mock.patch.object(realtime.Generation, "cancel", cancel), \
            mock.patch.object(CausalDMDDenoisingStage, "predict", predict), Gate(causal, 1, cancelled) as gate:
        with ws_client.connect(url, open_timeout=WAIT) as ws:
            ws.send(json.dumps({**START, "format": "rgb24"}))
            assert json.loads(ws.recv(timeout=WAIT))["type"] == "started"
            assert json.loads(ws.recv(timeout=WAIT))["index"] == 0
            ws.recv(timeout=WAIT)
            assert gate.waiting.wait(WAIT)
            at_close = len(steps)
        assert cancelled.wait(WAIT)  # the server saw the close and cancelled
        deadline = threading.Event()
        for _ in range(WAIT * 10):  # the engine is free again once the cancelled request ended
            if state.runner.queue_depth == 0:
                break
            deadline.wait(0.1)
        assert state.runner.queue_depth == 0
    per_step = 1  # one transformer call per DMD step (no CFG)
    assert len(steps) - at_close <= per_step  # stopped within one step of block 1
    assert gate.started == [0, 1] and gate.finished == [0]  # block 1 never finished, block 2 never started
    assert state.metrics.cancelled.labels("disconnect")._value.get() == counted + 1
    with ws_client.connect(url, open_timeout=WAIT) as ws:  # the next request: answered, identically
        ws.send(json.dumps({**START, "format": "rgb24"}))
        blocks, _, _ = read_until_done(ws)
    assert np.array_equal(np.concatenate(rgb(blocks)), frames_of(causal, "a red cat"))


def test_fmp4_blocks_decode_to_the_video(server, causal, tmp_path):
    import subprocess

    from diffcore.serve.fmp4 import ffmpeg_exe

    url, _ = server
    with ws_client.connect(url, open_timeout=WAIT) as ws:
        ws.send(json.dumps(START))  # fmp4 is the default format
        assert json.loads(ws.recv(timeout=WAIT))["format"] == "fmp4"
        blocks, _, done = read_until_done(ws)
    assert [h["index"] for h, _ in blocks] == [0, 1, 2] and blocks[0][0]["mime_type"].startswith('video/mp4; codecs="avc1.')
    path = tmp_path / "live.mp4"
    path.write_bytes(b"".join(data for _, data in blocks))
    run = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True)
    assert run.returncode == 0, run.stderr[-500:]
    decoded = np.frombuffer(run.stdout, np.uint8).reshape(-1, 32, 48, 3)
    want = frames_of(causal, "a red cat")
    assert decoded.shape[0] == 21 == done["num_frames"]
    mse = np.mean((decoded.astype(float) - want) ** 2)
    assert 10 * np.log10(255**2 / mse) > 20  # lossy H.264 (4:2:0) of noise-like random-weight frames ...
    nearest = [int(np.argmin([np.abs(d.astype(float) - w).mean() for w in want])) for d in decoded]
    assert nearest == list(range(21))  # ... but every decoded frame is its own frame, in order


def test_a_video_model_without_causal_blocks_gets_an_error_frame(fewstep_folders):
    with running_server(ours(fewstep_folders["dmd"]), ServeSettings()) as (base, _):
        with ws_client.connect(base.replace("http://", "ws://") + "/v1/realtime/video", open_timeout=WAIT) as ws:
            ws.send(json.dumps(START))
            error = json.loads(ws.recv(timeout=WAIT))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=WAIT)
    assert error["error"]["code"] == "model_not_realtime" and error["error"]["param"] == "model"
    assert closed.value.rcvd.code == 1008


def test_playground_live_panel_streams_and_switches_the_prompt_in_a_browser(causal):
    """The playground's live panel in headless chromium: the key goes in the first message, block 0 is painted
    while block 1 is still held, a prompt typed mid-stream applies from block 3, and the last frame painted is
    exactly the last frame of that switched generation."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    from diffcore.testing.browser import FLAGS, chromium

    exe = chromium()
    want = switched(causal, "a red cat", "a blue dog", 2)[0]
    read = threading.Event()
    real_change = realtime.Generation.change_prompt

    def change(self, prompt):
        real_change(self, prompt)
        read.set()

    settings = ServeSettings(served_model_name="self-forcing", api_key="live-key")
    with running_server(causal, settings) as (base, _), sync_api.sync_playwright() as pw, \
            mock.patch.object(realtime.Generation, "change_prompt", change), Gate(causal, 1, read) as gate:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#key-box:not(.hidden)", timeout=WAIT * 1000)
            page.fill("#api-key", "live-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#live-box:not(.hidden)", timeout=WAIT * 1000)
            for field, value in (("#prompt", "a red cat"), ("#width", "48"), ("#height", "32"), ("#frames", "21"),
                                 ("#seed", "2")):
                page.fill(field, value)
            page.click("#live-start")
            page.wait_for_function("+document.getElementById('live-canvas').dataset.framesShown >= 5",
                                   timeout=WAIT * 1000)
            assert gate.waiting.is_set() and 1 not in gate.finished  # painted while block 1 is not computed
            page.fill("#live-prompt", "a blue dog")
            page.click("#live-send")
            page.wait_for_function("document.getElementById('live-status').textContent === 'done' && "
                                   "+document.getElementById('live-canvas').dataset.framesShown === 21",
                                   timeout=WAIT * 1000)
            log = page.inner_text("#live-log")
            shown = page.evaluate("Array.from(document.getElementById('live-canvas').getContext('2d')"
                                  ".getImageData(0, 0, 48, 32).data)")
            assert page.inner_text("#live-error") == ""
        finally:
            browser.close()
    assert 'prompt "a blue dog" from block 3' in log and "done: 21 frames" in log, log
    painted = np.asarray(shown, np.uint8).reshape(32, 48, 4)
    assert (painted[..., 3] == 255).all()
    np.testing.assert_array_equal(painted[..., :3], want[-1])


def test_a_second_start_while_one_runs_and_the_request_timeout(causal):
    """A ``start`` while a generation runs is refused (the running one is cancelled with the connection); a
    generation past --request-timeout is cancelled at its next step with a ``timeout`` error frame (1011)."""
    settings = ServeSettings(request_timeout=2.0)
    with running_server(causal, settings) as (base, app):
        url, state = base.replace("http://", "ws://") + "/v1/realtime/video", app.state.diffcore
        cancelled = state.metrics.cancelled
        counts = {r: cancelled.labels(r)._value.get() for r in ("disconnect", "timeout")}
        for second, code, close, reason in (({**START, "format": "rgb24"}, "generation_running", 1008, "disconnect"),
                                            (None, "timeout", 1011, "timeout")):
            release = threading.Event()
            with Gate(causal, 1, release) as gate, ws_client.connect(url, open_timeout=WAIT) as ws:
                ws.send(json.dumps({**START, "format": "rgb24"}))
                assert json.loads(ws.recv(timeout=WAIT))["type"] == "started"
                assert json.loads(ws.recv(timeout=WAIT))["type"] == "block" and ws.recv(timeout=WAIT)
                assert gate.waiting.wait(WAIT)
                if second is not None:
                    ws.send(json.dumps(second))
                error = json.loads(ws.recv(timeout=WAIT))  # the timeout: 2 s after the start, block 1 still held
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=WAIT)
                release.set()
                for _ in range(WAIT * 10):
                    if state.runner.queue_depth == 0:
                        break
                    release.wait(0.1)
            assert (error["error"]["code"], closed.value.rcvd.code) == (code, close), error
            assert gate.finished == [0] and 2 not in gate.started  # stopped in block 1
            assert cancelled.labels(reason)._value.get() == counts[reason] + 1


def test_a_full_queue_is_an_error_frame_that_says_retry(causal):
    """One generation runs (held), one waits (--max-queue 1): a third start gets 429's queue_full and 1013."""
    release = threading.Event()
    with running_server(causal, ServeSettings(max_queue=1)) as (base, _), Gate(causal, 1, release) as gate:
        url = base.replace("http://", "ws://") + "/v1/realtime/video"
        with ws_client.connect(url, open_timeout=WAIT) as first, ws_client.connect(url, open_timeout=WAIT) as second, \
                ws_client.connect(url, open_timeout=WAIT) as third:
            first.send(json.dumps({**START, "format": "rgb24"}))
            assert json.loads(first.recv(timeout=WAIT))["type"] == "started" and gate.waiting.wait(WAIT)
            second.send(json.dumps({**START, "format": "rgb24"}))
            assert json.loads(second.recv(timeout=WAIT))["type"] == "started"  # queued behind the first
            third.send(json.dumps({**START, "format": "rgb24"}))
            error = json.loads(third.recv(timeout=WAIT))
            with pytest.raises(ConnectionClosed) as closed:
                third.recv(timeout=WAIT)
            release.set()
            for ws in (first, second):
                assert len(read_until_done(ws)[0]) == 3
    assert error["error"]["code"] == "queue_full" and error["error"]["type"] == "rate_limit_error"
    assert closed.value.rcvd.code == 1013


def test_playground_live_panel_plays_fmp4_through_media_source_in_a_browser(server, causal):
    """"H.264 video" in the live panel: the three fMP4 chunks go into a Media Source Extensions buffer in
    chromium, which holds the whole clip (21 frames at 16 fps) and shows, at the last frame's time, the
    generation's last frame (lossy: the nearest of the 21 frames, and close to it)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    from diffcore.testing.browser import FLAGS, chromium

    exe = chromium()
    want = frames_of(causal, "a red cat")
    base = server[0].replace("ws://", "http://").removesuffix("/v1/realtime/video")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#live-box:not(.hidden)", timeout=WAIT * 1000)
            for field, value in (("#prompt", "a red cat"), ("#width", "48"), ("#height", "32"), ("#frames", "21"),
                                 ("#seed", "2")):
                page.fill(field, value)
            page.select_option("#live-format", "fmp4")
            page.click("#live-start")
            page.wait_for_function("document.getElementById('live-status').textContent === 'done' && "
                                   "document.getElementById('live-video').dataset.chunks === '3'",
                                   timeout=WAIT * 1000)
            buffered = page.evaluate("(() => { const b = document.getElementById('live-video').buffered;"
                                     " return [b.length, b.start(0), b.end(0)]; })()")
            shown = page.evaluate("""async () => {
                const v = document.getElementById('live-video');
                v.pause();
                await new Promise((done) => { v.onseeked = done; v.currentTime = 20 / 16 + 0.01; });
                const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
                const ctx = c.getContext('2d'); ctx.drawImage(v, 0, 0);
                return [v.videoWidth, v.videoHeight, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];
            }""")
            assert page.inner_text("#live-error") == "" and page.is_hidden("#live-canvas")
        finally:
            browser.close()
    assert buffered[0] == 1 and buffered[1] < 0.01 and abs(buffered[2] - 21 / 16) < 0.5 / 16, buffered
    width, height, data = shown
    frame = np.asarray(data, np.uint8).reshape(height, width, 4)[..., :3].astype(float)
    assert (width, height) == (48, 32)
    distances = [np.abs(frame - w).mean() for w in want]
    psnr = 10 * np.log10(255**2 / np.mean((frame - want[20]) ** 2))
    print(f"fmp4 in chromium: last frame PSNR {psnr:.1f} dB")
    assert int(np.argmin(distances)) == 20 and psnr > 20, (int(np.argmin(distances)), psnr)


def test_diffcore_serve_command_streams_with_the_key_in_the_header(fewstep_folders, causal):
    """The real `diffcore serve` process (its uvicorn picks the WebSocket implementation the serve extra
    installs): the Authorization header authorizes, blocks stream, and the rgb24 frames equal generate()'s."""
    from diffcore.testing.serving import serve_process

    proc, base = serve_process("--model", str(fewstep_folders["causal"]), "--dtype", "float32", "--api-key", "k",
                               "--log-level", "warning")
    try:
        url = base.replace("http://", "ws://") + "/v1/realtime/video"
        with ws_client.connect(url, additional_headers={"Authorization": "Bearer k"}, open_timeout=WAIT) as ws:
            ws.send(json.dumps({**START, "format": "rgb24"}))
            blocks, _, done = read_until_done(ws)
    finally:
        proc.terminate()
        proc.wait(WAIT)
    assert [h["index"] for h, _ in blocks] == [0, 1, 2] and done["num_frames"] == 21
    got, want = np.concatenate(rgb(blocks)).astype(int), frames_of(causal, "a red cat").astype(int)
    assert np.abs(got - want).max() <= 1  # another process (its own thread count): float rounding at most
