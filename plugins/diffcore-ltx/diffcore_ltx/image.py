"""The image-to-video condition image: H.264 re-compression (as in training) and resizing to the video size."""
from __future__ import annotations

import subprocess

import numpy as np
import torch

DEFAULT_CRF = 33  # LTX-2.0 / 2.3 (diffusers' resolve_default_image_crf; 18 belongs to LTX-2.5's Gemma 4)


def recompress(image: np.ndarray, crf: int) -> np.ndarray:
    """One RGB uint8 frame through libx264 (veryfast, yuv420p) at ``crf`` and back, with the ffmpeg that
    imageio-ffmpeg ships; odd sizes are cropped to even (as diffusers' PyAV port does)."""
    from diffcore.audio import ffmpeg_exe

    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    frame = np.ascontiguousarray(image[:h, :w])
    encode = [ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-i", "pipe:0",
              "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p", "-f", "h264", "pipe:1"]
    stream = subprocess.run(encode, input=frame.tobytes(), capture_output=True, check=True).stdout
    decode = [ffmpeg_exe(), "-loglevel", "error", "-f", "h264", "-i", "pipe:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = subprocess.run(decode, input=stream, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.uint8)[: h * w * 3].reshape(h, w, 3).copy()


def preprocess(image, height: int, width: int, crf=None) -> torch.Tensor:
    """PIL RGB image -> (1, 3, height, width) in [-1, 1]: re-compressed, then bilinear-resized (diffusers'
    VideoProcessor with ``resample="bilinear"``)."""
    from PIL import Image

    crf = DEFAULT_CRF if crf is None else crf
    if crf:
        image = Image.fromarray(recompress(np.array(image.convert("RGB")), crf))
    image = image.resize((width, height), resample=Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1
