"""Self-attention K/V cache for block-causal video generation (self-forcing), one per request.

Latent frames are generated a block at a time; each block's self-attention attends to the keys and
values of the clean earlier blocks plus its own. The cache holds, per transformer layer, the K/V
of the frames generated so far in one preallocated buffer ``(B, capacity, H, D)``:

* a block's denoising calls write their K/V into the block's slots (each call overwrites the
  previous one), and the final pass on the clean block leaves the clean K/V there;
* with ``window`` (``local_attn_size``) frames of capacity, a block that does not fit evicts the
  oldest frames after the first ``sink`` frames (which stay forever), by moving the rest left —
  once per block, not per step (as the self-forcing reference implementation does).

Attention then reads ``buffer[:, :filled]``: the sink frames and the most recent frames, no mask
needed because the cache only ever holds the past and the current block.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError


class LayerKV:
    """One layer's cache. ``offset`` is the global index of the frame in the first non-sink slot."""

    __slots__ = ("owner", "k", "v", "filled", "offset")

    def __init__(self, owner: "CausalKVCache"):
        self.owner = owner
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.filled = 0  # frames held
        self.offset = owner.sink

    def frames(self) -> list[int]:
        """The global frame indices held, in slot order (what a block attends to)."""
        sink = min(self.owner.sink, self.filled)
        return list(range(sink)) + list(range(self.offset, self.offset + self.filled - sink))

    def update(self, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V ``(B, n * tokens_per_frame, H, D)`` of frames ``[start_frame, start_frame + n)``;
        return the K/V to attend to (every frame held, this block included)."""
        tpf, sink = self.owner.tokens_per_frame, self.owner.sink
        n = k.shape[1] // tpf
        if n * tpf != k.shape[1]:
            raise ValueError(f"{k.shape[1]} tokens are not whole frames of {tpf} tokens")
        if self.k is None:
            shape = (k.shape[0], self.owner.capacity * tpf, *k.shape[2:])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self._end_frame()
        if start_frame + n > end:  # new frames: they must continue the video
            if start_frame != end:
                raise ValueError(f"block at frame {start_frame} does not continue the cache (next frame {end})")
            self._make_room(n)
            self.filled += n
        slot = self._slot(start_frame)
        self.k[:, slot * tpf:(slot + n) * tpf] = k
        self.v[:, slot * tpf:(slot + n) * tpf] = v
        used = self.filled * tpf
        return self.k[:, :used], self.v[:, :used]

    def _end_frame(self) -> int:
        sink = self.owner.sink
        return self.filled if self.filled <= sink else self.offset + self.filled - sink

    def _slot(self, frame: int) -> int:
        sink = self.owner.sink
        if frame < sink:
            return frame
        if frame < self.offset:
            raise ValueError(f"frame {frame} was evicted from the cache")
        return sink + frame - self.offset

    def _make_room(self, n: int) -> None:
        cap, sink, tpf = self.owner.capacity, self.owner.sink, self.owner.tokens_per_frame
        evict = self.filled + n - cap
        if evict <= 0:
            return
        keep = self.filled - sink - evict  # recent frames that stay, moved left over the evicted ones
        if keep < 0:
            raise ConfigError(f"a block of {n} frames does not fit a {cap}-frame cache with {sink} sink frames")
        src = slice((sink + evict) * tpf, (sink + evict + keep) * tpf)
        dst = slice(sink * tpf, (sink + keep) * tpf)
        self.k[:, dst] = self.k[:, src].clone()
        self.v[:, dst] = self.v[:, src].clone()
        self.filled -= evict
        self.offset += evict


class CausalKVCache:
    """The per-request self-attention cache of every layer of a block-causal transformer.

    ``num_frames``: latent frames of the whole video; ``window``: frames the cache may hold (-1: all);
    ``sink``: leading frames never evicted. Buffers are allocated on each layer's first write.
    """

    def __init__(self, num_layers: int, tokens_per_frame: int, num_frames: int, window: int = -1, sink: int = 0):
        if window != -1 and window <= sink:
            raise ConfigError(f"a KV cache window of {window} frames cannot keep {sink} sink frames and a block")
        self.tokens_per_frame, self.sink = tokens_per_frame, sink
        self.capacity = num_frames if window == -1 else min(window, num_frames)
        self.layers = [LayerKV(self) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v) if t is not None)
