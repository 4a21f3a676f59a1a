"""Fragmented MP4 (H.264) made block by block, for the real-time video WebSocket (serve.realtime).

Why per block: ffmpeg's mp4 muxer writes a fragment only when the next keyframe (or the end) arrives, so one
long-lived encoder would hold every block back until the one after it. Each block is instead encoded on its
own (``-movflags frag_keyframe+empty_moov+default_base_moof``: it starts with a keyframe) and the boxes are
joined into one stream here: the first chunk is the init segment (``ftyp`` + ``moov``) and the first block's
``moof``/``mdat``; every later chunk is only that block's ``moof``/``mdat``, its decode time (``tfdt``) moved
to where the block starts and its fragment sequence numbers (``mfhd``) continued. The chunks concatenated are
one valid fragmented MP4 (what Media Source Extensions and ffmpeg read). The trailing index (``mfra``) is
dropped. Should a block's encoder ever describe the track differently (a different ``moov``), its chunk
carries that init segment again, which Media Source Extensions accept mid-stream.
"""
from __future__ import annotations

import struct
import subprocess
from fractions import Fraction

import numpy as np

from ..errors import InputError


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, offset, size) of the ISO BMFF boxes in ``data[start:end]`` (32-bit sizes: what ffmpeg writes here)."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size < 8 or i + size > end:
            raise InputError(f"ffmpeg wrote a malformed mp4 box {kind!r} at byte {i}")
        yield kind.decode("latin-1"), i, size
        i += size


def _child(data: bytes, parent_offset: int, parent_size: int, kind: str, header: int = 8):
    return next(((o, s) for k, o, s in _boxes(data, parent_offset + header, parent_offset + parent_size) if k == kind),
                None)


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("format 'fmp4' needs imageio-ffmpeg: pip install 'diffcore[video]' (or use format "
                         "'rgb24')") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


class Fmp4Stream:
    """One video's fragmented MP4, a chunk per ``chunk(frames)`` call ((n, H, W, 3) uint8)."""

    def __init__(self, fps: float):
        self.fps = Fraction(fps).limit_denominator(1001)
        self.frames = 0  # frames already sent: where the next block starts
        self.sequence = 0  # fragments already sent
        self.init: bytes | None = None
        self.timescale: int | None = None

    def encode(self, frames: np.ndarray) -> bytes:
        n, h, w, _ = frames.shape
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-framerate", str(self.fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
               "-preset", "veryfast", "-tune", "zerolatency",
               "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-f", "mp4", "-"]
        done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if done.returncode != 0:
            raise InputError(f"ffmpeg could not encode the block: {done.stderr.decode(errors='replace')[-500:]}")
        return done.stdout

    def chunk(self, frames: np.ndarray) -> bytes:
        h, w = frames.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes (as diffcore.outputs.VideoWriter)
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        data = self.encode(frames)
        out = bytearray()
        for kind, offset, size in _boxes(data):
            box = bytearray(data[offset:offset + size])
            if kind == "moov":
                init = data[:offset + size]  # ftyp + moov
                if init != self.init:
                    out += init
                    self.init, self.timescale = init, self._timescale(box)
            elif kind == "moof":
                self._retime(box)
                out += box
            elif kind == "mdat":
                out += box
        self.frames += len(frames)
        return bytes(out)

    @property
    def mime_type(self) -> str:
        """The stream's type for Media Source Extensions (``MediaSource.isTypeSupported``), from its avcC box."""
        at = (self.init or b"").find(b"avcC")
        if at < 0:
            return "video/mp4"
        profile, compat, level = self.init[at + 5:at + 8]
        return f'video/mp4; codecs="avc1.{profile:02x}{compat:02x}{level:02x}"'

    @staticmethod
    def _timescale(moov: bytearray) -> int:
        trak = _child(moov, 0, len(moov), "trak")
        mdia = _child(moov, *trak, "mdia")
        mdhd = _child(moov, *mdia, "mdhd")
        version = moov[mdhd[0] + 8]
        at = mdhd[0] + (28 if version == 1 else 20)
        return struct.unpack(">I", moov[at:at + 4])[0]

    def _retime(self, moof: bytearray) -> None:
        """Continue the fragment numbering and start the fragment's decode time where this block starts."""
        self.sequence += 1
        mfhd = _child(moof, 0, len(moof), "mfhd")
        struct.pack_into(">I", moof, mfhd[0] + 12, self.sequence)
        start = round(self.frames * self.timescale / self.fps)
        for kind, offset, size in _boxes(moof, 8, len(moof)):
            if kind != "traf":
                continue
            tfdt = _child(moof, offset, size, "tfdt")
            if tfdt is None:
                continue
            if moof[tfdt[0] + 8] == 1:
                base = struct.unpack_from(">Q", moof, tfdt[0] + 12)[0]
                struct.pack_into(">Q", moof, tfdt[0] + 12, base + start)
            else:
                base = struct.unpack_from(">I", moof, tfdt[0] + 12)[0]
                struct.pack_into(">I", moof, tfdt[0] + 12, base + start)
