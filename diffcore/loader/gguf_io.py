"""GGUF weight files: quantized tensors kept packed in memory, dequantized one layer at a time.

Why: the community ships FLUX, Qwen-Image and Wan transformers as GGUF files (Q8_0 is about half
of bf16, Q4_K about a quarter). A quantized tensor becomes a :class:`GGUFWeight`: the file's packed
bytes (memory-mapped, no copy) plus the ggml type. Any op that uses it (``F.linear`` in a layer,
``F.conv3d``, ...) first dequantizes it to the dtype of the op's other floating-point input, so only
one layer's dequantized weight exists at a time. F32 / F16 / BF16 tensors are ordinary tensors.

Dequantization follows ggml's reference (``ggml-quants.c``, mirrored in the ``gguf`` package's
``gguf.quants``): scales are widened to fp32 before multiplying, so the result equals
``gguf.quants.dequantize`` exactly (tested). diffusers multiplies in fp16 and differs by fp16
rounding (~5e-4 relative per weight).

Keys: a file whose keys are the Diffusers parameter names loads into the diffcore module as-is; a
file in a model's original layout (city96's FLUX / Wan GGUFs) is converted by the layouts the model
class declares (``key_layouts.py``), with fused tensors split by :func:`take_rows`, still packed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import CorruptCheckpointError, LoaderError, MissingFileError

QK_K = 256


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise LoaderError("reading .gguf files needs the `gguf` package: pip install 'diffcore[gguf]'") from e
    return gguf


# ---- dequantization (ggml block layouts; ``b`` is (n_blocks, bytes_per_block) uint8) ------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): low nibbles first, then high nibbles (the Q4/Q5 element order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """(n, k) bytes -> (n, count) bits, little-endian within each byte, byte after byte."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)[:, :count]


def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes (ggml ``get_scale_min_k4``)."""
    lo, hi = s[:, :4], s[:, 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)
    mid = s[:, 4:8]
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # sub-block 2i low, 2i+1 high
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - dmin.unsqueeze(-1) * mn.unsqueeze(-1)).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:].reshape(n, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    high = (qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1  # bit j: sub-block j
    q = (low | (high << 4)).float()
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - dmin.unsqueeze(-1) * mn.unsqueeze(-1)).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(n, 16)
    d = _f16(b[:, 208:210])
    low = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = (low | (high << 4)).reshape(n, 16, 16).float() - 32  # 16 sub-blocks of 16, in element order
    return (d.unsqueeze(-1) * scales.unsqueeze(-1) * q).reshape(n, QK_K)


def _bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


# ggml type name -> (elements per block, bytes per block, dequantizer)
_TYPES: dict[str, tuple[int, int, Callable]] = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1), "Q4_K": (QK_K, 144, _q4_k), "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
    "BF16": (1, 2, _bf16),
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64}
SUPPORTED = tuple(_TYPES) + tuple(_PLAIN)


def dequantize(packed: torch.Tensor, qtype: str, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed ggml bytes of type ``qtype`` -> a ``shape`` tensor of ``dtype``."""
    block, nbytes, fn = _TYPES[qtype]
    blocks = packed.reshape(-1, nbytes)
    return fn(blocks).to(dtype).reshape(shape)


# ---- the packed tensor --------------------------------------------------------------------------

_KEEP_PACKED = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.detach, torch.Tensor.clone,
                torch.Tensor.contiguous, torch.Tensor.pin_memory, torch.Tensor.share_memory_,
                torch.Tensor.requires_grad_}


# Attribute reads and storage queries answer for the packed uint8 tensor (so loaders and ``.to()`` see
# a non-floating tensor they must not cast); every other op sees the dequantized weight.
_RAW = {"__get__", "__set__", "is_floating_point", "is_complex", "element_size", "data_ptr", "untyped_storage",
        "storage_offset", "is_contiguous", "numel", "dim", "size", "stride", "nbytes", "__len__"}


class GGUFWeight(torch.Tensor):
    """A quantized weight: ``uint8`` packed blocks that act as their dequantized ``logical_shape`` tensor.

    Device moves, ``detach`` and copies keep it packed; every other op sees the dequantized tensor,
    in the dtype of that op's other floating-point tensor argument (``compute_dtype`` without one).
    """

    qtype: str
    logical_shape: tuple
    compute_dtype: torch.dtype

    @staticmethod
    def __new__(cls, packed: torch.Tensor, qtype: str, logical_shape, compute_dtype=torch.float32):
        self = torch.Tensor._make_subclass(cls, packed, False)
        self.qtype, self.logical_shape, self.compute_dtype = qtype, tuple(logical_shape), compute_dtype
        return self

    def packed(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(torch.uint8)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.packed(), self.qtype, self.logical_shape, dtype or self.compute_dtype)

    def __repr__(self, *args, **kwargs):
        return f"GGUFWeight({self.qtype}, shape={list(self.logical_shape)}, device={self.device})"

    def __reduce_ex__(self, proto):  # pickling
        return (GGUFWeight, (self.packed().clone(), self.qtype, self.logical_shape, self.compute_dtype))

    def __deepcopy__(self, memo):
        return GGUFWeight(self.packed().clone(), self.qtype, self.logical_shape, self.compute_dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KEEP_PACKED and isinstance(args[0], GGUFWeight):
            src = args[0]
            if func is torch.Tensor.requires_grad_:
                return src  # packed weights are for inference only
            if func is torch.Tensor.to:  # only device moves: the packed bytes must stay uint8
                kwargs.pop("dtype", None)
                args = (src,) + tuple(a for a in args[1:] if not isinstance(a, torch.dtype))
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return GGUFWeight(out, src.qtype, src.logical_shape, src.compute_dtype)
        if func in (torch.Tensor.__repr__, torch.Tensor.__format__):
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") in _RAW:  # metadata about the packed bytes themselves
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        dtype = _floating_dtype(args, kwargs)
        args = _unpacked(args, dtype)
        kwargs = {k: _unpacked(v, dtype) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _floating_dtype(args, kwargs) -> torch.dtype | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and not isinstance(a, GGUFWeight) and a.is_floating_point():
            return a.dtype
    return None


def _unpacked(value, dtype):
    if isinstance(value, GGUFWeight):
        return value.dequantize(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_unpacked(v, dtype) for v in value)
    return value


def take_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows ``[(start, stop), ...]`` (dim 0) of ``t``, concatenated; a :class:`GGUFWeight` stays packed.

    ggml packs each row (the last dim) into whole blocks, so rows ``a..b`` of a ``(R, C)`` weight are
    bytes ``a * row_bytes .. b * row_bytes`` with ``row_bytes = C / block * bytes_per_block``. One range
    is a view (no copy); several are one copy of the packed bytes. A range that does not fall on block
    boundaries (a quantized 1-D tensor) is dequantized instead.
    """
    if not isinstance(t, GGUFWeight):
        parts = [t[a:b] for a, b in rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    block, nbytes, _ = _TYPES[t.qtype]
    per_row = 1
    for d in t.logical_shape[1:]:
        per_row *= d
    if any((a * per_row) % block or (b * per_row) % block for a, b in rows):
        return take_rows(t.dequantize(), rows)
    packed = t.packed()
    parts = [packed[a * per_row // block * nbytes:b * per_row // block * nbytes] for a, b in rows]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    shape = (sum(b - a for a, b in rows), *t.logical_shape[1:])
    return GGUFWeight(out, t.qtype, shape, t.compute_dtype)


# ---- reading ------------------------------------------------------------------------------------

class GGUFFile:
    """The tensors of one .gguf file: names, logical shapes, and tensors on demand (memory-mapped)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path), "c")  # copy-on-write: writable views, file untouched
        except FileNotFoundError as e:
            raise MissingFileError(f"GGUF file {self.path} does not exist") from e
        except Exception as e:
            raise CorruptCheckpointError(f"{self.path} cannot be read as GGUF ({type(e).__name__}: {e}); "
                                         "it is probably truncated or not a GGUF file, re-download it") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        bad = sorted({t.tensor_type.name for t in self.tensors.values()} - set(SUPPORTED))
        if bad:
            raise LoaderError(f"{self.path} holds tensors of GGUF type(s) {', '.join(bad)}, which diffcore does not "
                              f"dequantize (supported: {', '.join(SUPPORTED)}); use a file quantized as e.g. Q8_0, Q5_K or Q4_K")

    @property
    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple:
        """The tensor's logical shape. city96's converter stores a tensor whose last dim is no multiple of 256
        (e.g. Wan's 5-D ``patch_embedding``) as ``(numel / 256, 256)`` rows and records the real shape under
        ``comfy.gguf.orig_shape.<key>``; the data is row-major either way, so only the shape differs."""
        field = self.reader.get_field(f"comfy.gguf.orig_shape.{key}")
        if field is not None:
            return tuple(int(field.parts[i][0]) for i in field.data)
        return tuple(int(d) for d in reversed(self.tensors[key].shape))  # ggml lists the innermost dim first

    def qtype(self, key: str) -> str:
        return self.tensors[key].tensor_type.name

    def tensor(self, key: str, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.tensors[key]
        name, shape = t.tensor_type.name, self.shape(key)
        data = torch.from_numpy(t.data)  # a view of the reader's memory map
        if name in _PLAIN:
            return data.view(_PLAIN[name]).reshape(shape)
        return GGUFWeight(data.view(torch.uint8).reshape(-1), name, shape, compute_dtype)
