"""Video output: result.frames, result.save("x.mp4") (H.264, yuv420p, the model's fps) and the CLI."""
from __future__ import annotations

import numpy as np
import pytest

imageio = pytest.importorskip("imageio.v2")
pytest.importorskip("imageio_ffmpeg")

from diffcore.cli import main  # noqa: E402
from wan_testlib import ours, random_image  # noqa: E402


def _read(path):
    reader = imageio.get_reader(str(path))
    try:
        return np.stack([frame for frame in reader]), reader.get_meta_data()  # list() trips on len()=inf
    finally:
        reader.close()


@pytest.mark.parametrize("kind,size,fps", [("t2v21", (32, 48), 16), ("ti2v", (64, 96), 24)])
def test_save_mp4_is_playable_at_the_model_fps(wan_folders, tmp_path, kind, size, fps):
    result = ours(wan_folders[kind]).generate(prompt="a cat", num_frames=9, height=size[0], width=size[1],
                                              num_inference_steps=2, output_type="np")
    assert result.is_video and result.fps == fps
    frames = result.frames
    assert len(frames) == 1 and len(frames[0]) == 9 and frames[0][0].size == (size[1], size[0])
    path = result.save(tmp_path / "x.mp4")
    data, meta = _read(path)
    assert data.shape == (9, *size, 3)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == fps
    # lossy, but the same video: per-frame mean brightness within 2%
    means = data.reshape(9, -1).mean(1) / 255
    assert np.abs(means - result.output[0].reshape(9, -1).mean(1)).max() < 0.02


def test_cli_generate_writes_mp4(wan_folders, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(["generate", "--model", str(wan_folders["t2v21"]), "--prompt", "a red cat", "--num-frames", "5",
                 "--height", "32", "--width", "48", "--steps", "2", "--quiet", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    data, meta = _read(out)
    assert data.shape == (5, 32, 48, 3) and meta["fps"] == 16


def test_cli_image_to_video(wan_folders, tmp_path):
    image = tmp_path / "in.png"
    random_image(56, 40).save(image)
    out = tmp_path / "i2v.mp4"
    code = main(["generate", "--model", str(wan_folders["i2v21"]), "--prompt", "a cat", "--image", str(image),
                 "--num-frames", "5", "--height", "48", "--width", "32", "--steps", "2", "--quiet",
                 "--dtype", "float32", "--output", str(out)])
    assert code == 0
    data, _ = _read(out)
    assert data.shape == (5, 48, 32, 3)
