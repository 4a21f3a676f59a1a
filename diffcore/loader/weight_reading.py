"""Read weight files: safetensors memory-mapped (a tensor that keeps its dtype on the CPU is a view into the
file mapping, no copy); pickle (``.bin``/``.pt``/``.ckpt``) only with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import CorruptCheckpointError, MissingFileError
from ..memory import map_file
from . import key_layouts as _layouts


@contextlib.contextmanager
def open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingFileError(f"weight file {path} does not exist") from e
        raise CorruptCheckpointError(
            f"weight file {path} cannot be read as safetensors ({e}); it is probably truncated or corrupt, "
            "delete it and re-download the model"
        ) from e
    with handle as f:
        yield f


class _Reader:
    """Uniform view of one weight file: key list, shapes from the header, tensors on demand."""

    def __init__(self, keys: list[str], shape: Callable[[str], tuple], tensor: Callable[[str], torch.Tensor],
                 layout: "_layouts.CheckpointLayout | None" = None):
        self.keys, self.shape, self.tensor, self.layout = keys, shape, tensor, layout

    def through(self, layouts: Sequence["_layouts.CheckpointLayout"],
                checkpoint_keys: Sequence[str] | None = None) -> "_Reader":
        """This file seen through the checkpoint layout its keys (or all shards' ``checkpoint_keys``) match
        (see ``key_layouts``)."""
        v = _layouts.view(self.keys, self.shape, self.tensor, layouts, checkpoint_keys)
        return _Reader(v.keys, v.shape, v.tensor, v.layout)


# safetensors dtype names torch can view raw little-endian bytes as.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _SafetensorsViews:
    """Tensors as views of one copy-on-write mapping of the whole file.

    ``safe_open`` validates the file (and serves anything unusual), but its ``get_tensor`` costs
    ~60 us per tensor; slicing one ``torch.frombuffer`` of the mapping costs a few. Writes to a
    parameter go to private pages, never to the file.
    """

    def __init__(self, path: Path, handle):
        self.path, self.handle, self.base = path, handle, None
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
        self.start = 8 + size

    def shape(self, key: str) -> tuple:
        return tuple(self.header[key]["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        begin, end = (self.start + o for o in info["data_offsets"])
        if dtype is None or begin % dtype.itemsize or sys.byteorder != "little":
            return self._get_tensor(key)
        if self.base is None:
            with open(self.path, "rb") as f:
                self.base = map_file(f.fileno())
        return self.base[begin:end].view(dtype).view(info["shape"])

    def _get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(key)
        except Exception as e:
            raise CorruptCheckpointError(f"tensor {key!r} in {self.path} cannot be read ({e}); re-download it") from e


@contextlib.contextmanager
def open_weights(path: Path, pickle_cache: dict) -> Iterator[_Reader]:
    if path.suffix == ".gguf":  # quantized tensors stay packed (see gguf_io)
        from .gguf_io import GGUFFile

        f = GGUFFile(path)
        yield _Reader(f.keys, f.shape, f.tensor)
        return
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            views = _SafetensorsViews(path, f)
            yield _Reader(list(f.keys()), views.shape, views.tensor)
        return
    if path not in pickle_cache:  # read once for both passes
        pickle_cache[path] = _torch_load(path)
    sd = pickle_cache[path]
    yield _Reader(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__)


def all_keys(files: Sequence[Path], pickle_cache: dict) -> list[str]:
    """Every shard's tensor names (headers only), to choose one checkpoint layout for all shards."""
    keys: list[str] = []
    for path in files:
        with open_weights(path, pickle_cache) as reader:
            keys.extend(reader.keys)
    return keys


def file_shapes(files: Sequence[Path], layouts: Sequence["_layouts.CheckpointLayout"] = ()) -> dict[str, tuple]:
    """{tensor name as the layout names it: shape} over all files (headers only; pickle files are skipped)."""
    files = [Path(f) for f in files if Path(f).suffix in (".gguf", ".safetensors") and Path(f).is_file()]
    every = all_keys(files, {}) if layouts and len(files) > 1 else None
    shapes: dict[str, tuple] = {}
    for path in files:
        with open_weights(path, {}) as reader:
            view = reader.through(layouts, every)
            shapes.update({k: tuple(view.shape(k)) for k in view.keys})
    return shapes


def file_keys(path: Path) -> list[str]:
    """The tensor names of one weight file (headers only; pickle files are not opened for this)."""
    path = Path(path)
    if path.suffix not in (".gguf", ".safetensors") or not path.is_file():
        return []
    with open_weights(path, {}) as reader:
        return list(reader.keys)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpointError(
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses ({e}); "
            "convert it to safetensors in a trusted environment"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"pickle weight file {path} cannot be read ({e}); re-download it") from e
    if isinstance(sd, dict) and set(sd) == {"state_dict"}:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptCheckpointError(f"{path} does not hold a flat dict of tensors")
    return sd
