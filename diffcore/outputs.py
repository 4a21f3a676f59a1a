"""Generation results and writing them to disk (images, H.264 mp4 for videos with their sound, .wav)."""
from __future__ import annotations

import contextlib

import os
from pathlib import Path
from typing import Any, Optional

import attrs
import numpy as np

from .audio import mux_into_mp4, write_wav
from .errors import InputError

DEFAULT_FPS = 16  # a video's frame rate when neither the request nor the model says (PipelineConfig.default_fps)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MEDIA_SUFFIXES = IMAGE_SUFFIXES | {".mp4", ".wav"}


def to_uint8(array) -> np.ndarray:
    """Floats in [0, 1] -> uint8 pixels, rounded: how every saved or streamed picture and frame is made."""
    return (np.clip(np.asarray(array), 0, 1) * 255).round().astype(np.uint8)


def to_pil(array):
    from PIL import Image

    return Image.fromarray(to_uint8(array))  # a torch tensor (output_type="pt") too


class VideoWriter:
    """An H.264 mp4 (yuv420p, playable everywhere) written as frames arrive: ``append`` (F, H, W, 3)
    floats in [0, 1] any number of times, then ``close`` (or use it as a context manager)."""

    def __init__(self, path: str | Path, fps: int):
        try:
            import imageio.v2 as imageio
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise InputError("writing .mp4 needs imageio and imageio-ffmpeg: pip install 'diffcore[video]'") from exc
        self._writer = imageio.get_writer(str(path), fps=fps, codec="libx264", pixelformat="yuv420p",
                                          macro_block_size=1, ffmpeg_log_level="error")
        self.frames = 0

    def append(self, frames: np.ndarray) -> None:
        data = to_uint8(frames)
        h, w = data.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for frame in data:
            self._writer.append_data(frame)
        self.frames += len(data)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(frames: np.ndarray, path: Path, fps: int) -> None:
    """Write (F, H, W, 3) floats in [0, 1] as H.264 mp4."""
    with VideoWriter(path, fps) as writer:
        writer.append(frames)


@attrs.define
class GenerationResult:
    """What ``DiffGenerator.generate`` returns.

    ``output``: float32 in [0, 1], (B, H, W, 3) for images or (B, F, H, W, 3) for videos: numpy, or a
    torch tensor for output_type="pt" (None when output_type="latent"); ``images`` / ``frames``: PIL
    views of it; ``latents``: the final latents (for output_type="latent", in the form the model's diffusers
    pipeline returns them: ``PipelineConfig.latent_output``); ``timings``: seconds per stage; ``cache_stats``: the
    step cache's counters for this request (None without a cache); ``audios``: the sound track of each
    item, float32 (B, channels, samples) in [-1, 1] at ``audio_sample_rate`` Hz (None for silent models);
    ``audio``: the first item's, (channels, samples). ``layers``: for a model that makes several pictures per
    prompt (Qwen-Image-Layered: RGBA layers, ``output`` (prompts * layers, H, W, 4)), how many per prompt.
    ``ignored_parameters``: the parameters the caller set that the model never read (each was warned about:
    diffcore.ignored; a server refuses them).
    """

    output: Optional[np.ndarray]
    latents: Any
    timings: dict
    is_video: bool = False
    fps: Optional[int] = None
    output_type: str = "pil"
    cache_stats: Optional[dict] = None
    audios: Optional[np.ndarray] = None
    audio_sample_rate: Optional[int] = None
    layers: Optional[int] = None
    ignored_parameters: tuple = ()  # what the caller set and the model never read (warned; a server refuses it)
    _pil: Optional[list] = None

    @property
    def images(self) -> list:
        if self.output is None:
            return []
        if self.is_video:
            return [to_pil(v[0]) for v in self.output]  # first frame of each video
        if self._pil is None:
            self._pil = [to_pil(img) for img in self.output]
        return self._pil

    @property
    def audio(self) -> Optional[np.ndarray]:
        return None if self.audios is None else self.audios[0]

    @property
    def frames(self) -> list[list]:
        if self.output is None:
            return []
        if not self.is_video:
            return [[img] for img in self.images]
        return [[to_pil(f) for f in video] for video in self.output]

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Save item ``index``: an image (.png/.jpg/.webp) or, for videos, .mp4 with its sound track if it has one
        (or the first frame as image); .wav writes the sound alone."""
        path = Path(path)
        suffix = path.suffix.lower()
        check_save_path(path, writable=True)  # a missing folder, a directory, no permission: an error naming the path
        try:
            return self._write(path, suffix, index)
        except OSError as exc:  # a full disk, a file system gone read-only while writing
            with contextlib.suppress(OSError):
                path.unlink()  # no half-written file left behind
            raise InputError(f"cannot save {str(path)!r}: {exc.strerror or exc}") from None

    def _write(self, path: Path, suffix: str, index: int) -> Path:
        if suffix == ".wav":
            if self.audios is None:
                raise InputError(f"cannot save {str(path)!r}: this result has no sound track; save .mp4 or an image")
            return write_wav(self.audios[self._index(index, len(self.audios))], self.audio_sample_rate, path)
        if self.output is None:
            raise InputError("this result holds latents only (output_type='latent'); nothing to save as media")
        index = self._index(index, len(self.output))
        if suffix == ".mp4":
            item = np.asarray(self.output[index])
            frames = item if self.is_video else item[None]
            write_video(frames, path, self.fps or DEFAULT_FPS)
            if self.audios is not None:
                mux_into_mp4(path, self.audios[index], self.audio_sample_rate)
        elif suffix in IMAGE_SUFFIXES:
            item = np.asarray(self.output[index])
            to_pil(item[0] if self.is_video else item).save(path)
        return path

    def save_layers(self, path: str | Path) -> list[Path]:
        """A layered result (``layers``): every layer as its own picture, ``out-layer1.png``, ``out-layer2.png``, ...
        for ``path`` ``out.png`` (``out-2-layer1.png`` ... for the second prompt of several)."""
        path = Path(path)
        if not self.layers:
            return [self.save(path)]
        prompts = len(self.output) // self.layers
        paths = []
        for i in range(len(self.output)):
            prompt = f"-{i // self.layers + 1}" if prompts > 1 else ""
            paths.append(self.save(path.with_name(f"{path.stem}{prompt}-layer{i % self.layers + 1}{path.suffix}"), i))
        return paths

    @staticmethod
    def _index(index, n: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise InputError(f"index={index!r}: this result holds {n} item(s) (0 to {n - 1})")
        return index


def check_save_path(path: str | Path, writable: bool = False) -> Path:
    """Refuse a file name ``GenerationResult.save`` cannot write. With ``writable`` (the CLI, before it
    loads a model) also refuse a path that is a directory, whose folder does not exist (it is not
    created: a typo should not make folders), or where no file can be created."""
    path = Path(path)
    if path.suffix.lower() not in MEDIA_SUFFIXES:
        raise InputError(f"cannot save {str(path)!r}: use one of {', '.join(sorted(MEDIA_SUFFIXES))}")
    if not writable:
        return path
    folder = path.parent
    if path.is_dir():
        raise InputError(f"cannot save {str(path)!r}: it is a directory; name a file in it, e.g. {str(path / 'out.png')!r}")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise InputError(f"cannot save {str(path)!r}: the folder {str(folder)!r} {what}; create it first "
                         f"(mkdir -p {str(folder)!r}) or choose another --output")
    try:  # the only reliable test (permissions, read-only file systems, root): create a file there
        import tempfile

        with tempfile.NamedTemporaryFile(dir=folder, prefix=".diffcore-", suffix=path.suffix):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as exc:
        raise InputError(f"cannot save {str(path)!r}: {str(folder)!r} is not writable ({exc.strerror or exc})") from None
    return path
