"""Sound tracks: a waveform written as .wav, muxed into an mp4 as AAC, and read back.

Waveforms are float arrays (channels, samples) in [-1, 1]. The mp4 side uses the ffmpeg binary that
imageio-ffmpeg ships (no system ffmpeg needed), the same one the video writer uses.
"""
from __future__ import annotations

import os
import re
import subprocess
import wave
from pathlib import Path

import numpy as np

from .errors import InputError


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("writing sound into .mp4 needs imageio-ffmpeg: pip install 'diffcore[video]'") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def as_waveform(audio) -> np.ndarray:
    """(channels, samples) float32 from a numpy array or torch tensor; a 1-D array is one channel."""
    data = np.asarray(audio.float().cpu() if hasattr(audio, "float") else audio, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[1] == 0:
        raise InputError(f"audio must be (channels, samples), got shape {tuple(data.shape)}")
    return data


def write_wav(audio, sample_rate: int, path: str | Path) -> Path:
    """16-bit PCM .wav (what every player reads); values outside [-1, 1] are clipped."""
    data = as_waveform(audio)
    pcm = (np.clip(data, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(data.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.T.tobytes())
    return Path(path)


def mux_into_mp4(video_path: str | Path, audio, sample_rate: int, bitrate: str = "192k") -> None:
    """Add ``audio`` to the silent mp4 at ``video_path`` as an AAC track (the video stream is copied)."""
    data = as_waveform(audio)
    video_path = Path(video_path)
    tmp = video_path.with_name(f".{video_path.stem}.mux{video_path.suffix}")
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video_path),
           "-f", "f32le", "-ar", str(int(sample_rate)), "-ac", str(data.shape[0]), "-i", "pipe:0",
           "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", bitrate,
           "-movflags", "+faststart", str(tmp)]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(np.clip(data, -1, 1).T).tobytes(), capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise InputError(f"muxing the sound into {str(video_path)!r} failed: {proc.stderr.decode(errors='replace')[-500:]}")
    os.replace(tmp, video_path)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """The first audio stream of a media file, decoded: ((channels, samples) float32, sample rate).
    Raises InputError when the file has no audio stream."""
    exe = ffmpeg_exe()
    info = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True).stderr.decode(errors="replace")
    match = re.search(r"Stream #\S+.*?Audio: [^,]+, (\d+) Hz, (mono|stereo|(\d+) channels)", info)
    if match is None:
        raise InputError(f"{str(path)!r} has no audio stream")
    rate = int(match.group(1))
    channels = {"mono": 1, "stereo": 2}.get(match.group(2)) or int(match.group(3))
    raw = subprocess.run([exe, "-loglevel", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le",
                          "-ac", str(channels), "-ar", str(rate), "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<f4").reshape(-1, channels).T.copy(), rate
