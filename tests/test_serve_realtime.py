"""WebSocket /v1/realtime/video with a real client library over a real socket (127.0.0.1): the handshake obeys
the Host / Origin rules and the API key, bad input gets an OpenAI-style error frame and a clean close, the
server answers the next request identically; and the fragmented-MP4 chunks join into one playable video.
(Streaming a block-causal model: plugins/diffcore-wan/tests/test_realtime.py.)"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client", reason="the serve extra's websockets is not installed")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, running_server  # noqa: E402

IMAGE = {"prompt": "a red circle", "size": "32x32", "seed": 3, "num_inference_steps": 2}
EVIL = "http://evil.example"


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/realtime/video"


def error_then_close(ws) -> tuple[dict, int]:
    """The server's error frame and the close code that follows it."""
    frame = json.loads(ws.recv(timeout=30))
    assert frame["type"] == "error" and set(frame["error"]) >= {"message", "type", "param", "code"}, frame
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    return frame["error"], closed.value.rcvd.code


def image_of(base: str) -> np.ndarray:
    from types import SimpleNamespace

    r = httpx.post(base + "/v1/images/generations", json=IMAGE, timeout=60)
    assert r.status_code == 200, r.text
    return decode_b64(SimpleNamespace(b64_json=r.json()["data"][0]["b64_json"]))


@pytest.fixture(scope="module")
def server(toy_gen):
    with running_server(toy_gen, ServeSettings(served_model_name="toy")) as (base, _):
        yield base


BAD = [  # (what the client sends, the error's code, its param)
    ("not json {", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    (b"\x00\x01", "invalid_message", None),
    (json.dumps({"type": "pause"}), "unknown_message_type", "type"),
    (json.dumps({"prompt": "no type"}), "unknown_message_type", "type"),
    (json.dumps({"type": "prompt", "prompt": "a dog"}), "no_generation", "prompt"),  # nothing runs yet
    (json.dumps({"type": "prompt", "prompt": ""}), "invalid_value", "prompt"),
    (json.dumps({"type": "start", "prompt": "a cat", "format": "rgb24"}), "model_not_realtime", "model"),  # images
]


@pytest.mark.parametrize("sent,code,param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gets_an_error_frame_a_clean_close_and_the_server_is_unaffected(server, toy_gen, sent, code, param):
    before = image_of(server)
    with ws_client.connect(ws_url(server), open_timeout=30) as ws:
        ws.send(sent)
        error, close = error_then_close(ws)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), error
    assert close == 1008 and error["request_id"].startswith("req_")
    if code == "model_not_realtime":
        assert "block-causal" in error["message"] and "/v1/images/generations" in error["message"]
    assert np.array_equal(image_of(server), before)  # the next request: answered, identically
    want = np.asarray(toy_gen.generate(prompt="a red circle", height=32, width=32, num_inference_steps=2,
                                       seed=3).images[0])
    np.testing.assert_array_equal(before, want)


def test_a_foreign_origin_or_host_cannot_open_the_socket(toy_gen):
    """Cross-site WebSocket hijacking: the handshake is an HTTP GET, but a page can read a WebSocket's answers,
    so the Origin rule applies to it; a DNS-rebinding Host is refused as for every route."""
    settings = ServeSettings(served_model_name="toy", cors_origins=("http://friend.example",))
    with running_server(toy_gen, settings) as (base, _):
        url = ws_url(base)
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(url, origin=EVIL, open_timeout=30)
        assert refused.value.response.status_code == 403
        body = json.loads(refused.value.response.body)
        assert body["error"]["code"] == "cross_origin" and "WebSocket" in body["error"]["message"]
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(url, additional_headers={"Host": "evil.example"}, open_timeout=30)
        assert refused.value.response.status_code == 400
        for own in (base, "http://friend.example"):  # the server's own pages, and a --cors-origin
            with ws_client.connect(url, origin=own, open_timeout=30) as ws:
                ws.send(json.dumps({"type": "start", "prompt": "a cat"}))
                assert error_then_close(ws)[0]["code"] == "model_not_realtime"  # past the handshake


def test_api_key_in_the_header_or_the_first_message(toy_gen):
    settings = ServeSettings(served_model_name="toy", api_key="sekrit")
    start = json.dumps({"type": "start", "prompt": "a cat"})
    with running_server(toy_gen, settings) as (base, _):
        url = ws_url(base)
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(url, additional_headers={"Authorization": "Bearer wrong"}, open_timeout=30)
        assert refused.value.response.status_code == 401
        with ws_client.connect(url, open_timeout=30) as ws:  # no key: the first message must bring it
            ws.send(start)
            error, close = error_then_close(ws)
        assert error["code"] == "invalid_api_key" and "auth" in error["message"] and close == 1008
        with ws_client.connect(url, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "auth", "api_key": "wrong"}))
            assert error_then_close(ws)[0]["code"] == "invalid_api_key"
        for headers, first in (({"Authorization": "Bearer sekrit"}, []),
                               ({}, [json.dumps({"type": "auth", "api_key": "sekrit"})])):
            with ws_client.connect(url, additional_headers=headers, open_timeout=30) as ws:
                for message in [*first, start]:
                    ws.send(message)
                assert error_then_close(ws)[0]["code"] == "model_not_realtime"  # authorized: the model is the problem


def test_fmp4_chunks_join_into_one_video_with_continuous_timestamps(tmp_path):
    """Block by block: the first chunk carries the init segment, the later ones only their fragments, moved to
    where their block starts; joined, ffmpeg reads every frame at its time, close to the raw frames."""
    from diffcore.serve.fmp4 import Fmp4Stream, ffmpeg_exe

    frames = np.zeros((21, 32, 48, 3), np.uint8)
    frames[...] = np.linspace(0, 160, 48, dtype=np.uint8)[:, None]  # a grey ramp, a bar growing frame by frame
    for f in range(21):
        frames[f, 8:24, : 2 * f + 2] = 255
    stream = Fmp4Stream(16)
    chunks = [stream.chunk(frames[a:b]) for a, b in ((0, 5), (5, 13), (13, 21))]
    assert b"ftyp" in chunks[0][:8] and b"moov" in chunks[0] and "avc1." in stream.mime_type
    assert all(b"moov" not in c and c[4:8] == b"moof" for c in chunks[1:])
    path = tmp_path / "joined.mp4"
    path.write_bytes(b"".join(chunks))
    run = subprocess.run([ffmpeg_exe(), "-i", str(path), "-vf", "showinfo", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], capture_output=True)
    assert run.returncode == 0, run.stderr[-500:]
    decoded = np.frombuffer(run.stdout, np.uint8).reshape(-1, 32, 48, 3)
    times = [float(line.split(b"pts_time:")[1].split()[0]) for line in run.stderr.splitlines() if b"pts_time:" in line]
    assert decoded.shape[0] == 21 and times == [i / 16 for i in range(21)]
    mse = np.mean((decoded.astype(float) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35  # H.264 is lossy; the frames are the right ones, in order
    nearest = [int(np.argmin([np.abs(d.astype(float) - f).mean() for f in frames])) for d in decoded]
    assert nearest == list(range(21))
