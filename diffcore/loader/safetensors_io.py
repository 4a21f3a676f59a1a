"""Find a component's weight files and assign them into a module built on the meta device.

Safetensors files are memory-mapped: a tensor whose dtype already matches and that stays on the CPU
becomes the module's parameter as-is (a view into the file mapping, no copy). Pickle files
(``.bin``/``.pt``/``.ckpt``) are read only on explicit opt-in, with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import CorruptCheckpointError, LoaderError, MissingFileError, PickleRefusedError, WeightMismatchError
from .model_index import read_json

log = logging.getLogger(__name__)

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_LISTED = 10

KeyMap = Callable[[str], "str | None"]


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


def _few(items: Sequence[str]) -> str:
    items = list(items)
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _sharded(index: Path, *, check_keys: bool) -> list[Path]:
    """Shards listed in ``*.index.json``; every one must exist (and, for safetensors, hold its keys)."""
    weight_map = read_json(index, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"weight index {index} has no 'weight_map' object; re-download it")
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    shards = []
    for name, keys in by_shard.items():
        shard = index.parent / name
        if not shard.is_file():
            raise MissingFileError(
                f"shard {shard.name} listed in {index} does not exist (needed for {len(keys)} tensors, e.g. {keys[0]}); "
                "the download is incomplete, re-download the model"
            )
        if check_keys:
            with _open_safetensors(shard) as f:
                present = set(f.keys())
            absent = [k for k in keys if k not in present]
            if absent:
                raise CorruptCheckpointError(
                    f"{index} places {len(absent)} tensors in {shard}, which does not contain them: {_few(absent)}; "
                    "the index and shards come from different versions, re-download the model"
                )
        shards.append(shard)
    return shards


def find_weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of one component folder, safetensors preferred.

    Order of preference: ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``; a sharded
    ``*.safetensors.index.json``; pickle files, which raise :class:`PickleRefusedError` unless
    ``allow_pickle``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"component folder {folder} does not exist")
    for name in SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _sharded(indexes[0], check_keys=True)

    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).is_file()]
    pickle_indexes = sorted(folder.glob("*.bin.index.json"))
    if not pickles and not pickle_indexes:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles or pickle_indexes:
        names = [p.name for p in (pickles or pickle_indexes)]
        if not allow_pickle:
            raise PickleRefusedError(
                f"{folder} has only pickle weights ({', '.join(names)}), no .safetensors. Unpickling can run "
                "code hidden in the file; diffcore reads pickle with torch.load(weights_only=True), which blocks "
                "most but not all such attacks. If you trust the source, opt in with allow_pickle=True "
                "(CLI: --allow-pickle), or convert the weights to safetensors."
            )
        return pickles if pickles else _sharded(pickle_indexes[0], check_keys=False)
    raise MissingFileError(
        f"no weights in {folder}: expected {' or '.join(SAFETENSORS_NAMES)}, or a sharded "
        f"*.safetensors.index.json with its shards (found: {_listing(folder)})"
    )


# ---- reading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_safetensors(path: Path):
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

    def __init__(self, keys: list[str], shape: Callable[[str], tuple], tensor: Callable[[str], torch.Tensor]):
        self.keys, self.shape, self.tensor = keys, shape, tensor


@contextlib.contextmanager
def _open(path: Path, pickle_cache: dict) -> Iterator[_Reader]:
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:

            def tensor(key: str) -> torch.Tensor:
                try:
                    return f.get_tensor(key)
                except Exception as e:
                    raise CorruptCheckpointError(f"tensor {key!r} in {path} cannot be read ({e}); re-download it") from e

            yield _Reader(list(f.keys()), lambda k: tuple(f.get_slice(k).get_shape()), tensor)
        return
    if path not in pickle_cache:  # read once for both passes
        pickle_cache[path] = _torch_load(path)
    sd = pickle_cache[path]
    yield _Reader(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__)


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


# ---- loading ----------------------------------------------------------------------------------


def _keep_fp32(name: str, modules: Sequence[str]) -> bool:
    parts = name.split(".")
    return any(m in parts for m in modules)


def _materialise_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        hook = getattr(sub, "_init_buffers", None)
        if callable(hook) and any(b.is_meta for b in sub.buffers()):
            hook(device)


def load_into_module(
    module: nn.Module,
    files: Sequence[Path],
    key_map: KeyMap | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Assign the tensors of ``files`` into ``module`` (normally built on the meta device).

    - ``key_map`` renames each checkpoint key to a parameter name; returning ``None`` drops the key.
    - ``dtype`` converts floating-point tensors (integer/bool ones keep theirs); ``None`` keeps the
      checkpoint's dtype. As in Diffusers, floating tensors under a module named in the class
      attribute ``_keep_in_fp32_modules`` stay float32. A tensor already in the right dtype on
      the CPU is not copied: the parameter is a view of the memory-mapped file.
    - Every key, name and shape is checked against ``module.state_dict()`` before any data is
      read; problems raise one :class:`WeightMismatchError` listing them. ``strict=False`` ignores
      unexpected keys and tolerates missing ones that the module already holds off the meta device.
    - Buffers that are not saved (``persistent=False``, e.g. precomputed tables) are still on the
      meta device after loading. Convention: a module (root or submodule) that owns such buffers
      defines ``_init_buffers(self, device: torch.device) -> None``, which recomputes them on
      ``device``; it is called for every module whose buffers are still on meta. Anything left on
      meta afterwards is an error naming the tensors.
    """
    files = [Path(f) for f in files]
    if not files:
        raise LoaderError(f"no weight files given for {type(module).__name__}")
    device = torch.device(device)
    expected = module.state_dict(keep_vars=True)
    where = ", ".join(str(f) for f in files)

    pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
    # Pass 1: headers only. Map names, find duplicates, missing/unexpected keys, shape mismatches.
    plan: dict[str, tuple[Path, str]] = {}  # module name -> (file, checkpoint key)
    unexpected, mismatched, duplicated = [], [], []
    for path in files:
        with _open(path, pickle_cache) as reader:
            for key in reader.keys:
                name = key_map(key) if key_map is not None else key
                if name is None:
                    continue
                if name in plan:
                    duplicated.append(f"{name} (from {plan[name][0].name}:{plan[name][1]} and {path.name}:{key})")
                    continue
                plan[name] = (path, key)
                if name not in expected:
                    unexpected.append(f"{key} ({path.name})" if name == key else f"{key} -> {name} ({path.name})")
                    continue
                shape, want = reader.shape(key), tuple(expected[name].shape)
                if shape != want:
                    mismatched.append(f"{name}: checkpoint {list(shape)} vs module {list(want)} ({path.name})")
    missing = [n for n in expected if n not in plan and (strict or expected[n].is_meta)]
    if not strict and unexpected:
        log.warning("%s: ignoring %d unexpected checkpoint keys: %s", type(module).__name__, len(unexpected), _few(unexpected))
        unexpected = []
    if missing or unexpected or mismatched or duplicated:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (in the module, not in the checkpoint): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not in the module): {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_few(mismatched)}")
        if duplicated:
            parts.append(f"{len(duplicated)} keys given twice: {_few(duplicated)}")
        hint = (
            " Check that config.json belongs to these weights; if the checkpoint names keys differently, "
            "the model class must rename them in map_state_dict_key."
        )
        err = WeightMismatchError(
            f"weights in {where} do not fit {type(module).__name__}: " + "; ".join(parts) + "." + hint
        )
        err.missing, err.unexpected, err.mismatched, err.files = missing, unexpected, mismatched, files
        raise err

    # Pass 2: read tensors (mmapped views) and convert only where dtype or device differ.
    keep_fp32 = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in plan.items():
        if name in expected:
            by_file.setdefault(path, []).append((name, key))
    state: dict[str, torch.Tensor] = {}
    for path, pairs in by_file.items():
        with _open(path, pickle_cache) as reader:
            for name, key in pairs:
                t = reader.tensor(key)
                target = t.dtype
                if dtype is not None and t.is_floating_point():
                    target = torch.float32 if keep_fp32 and _keep_fp32(name, keep_fp32) else dtype
                if t.dtype != target or t.device != device:
                    t = t.to(device=device, dtype=target)
                state[name] = t
    module.load_state_dict(state, strict=False, assign=True)

    _materialise_buffers(module, device)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise LoaderError(
            f"{type(module).__name__}: tensors {_few(left)} are not in {where} and are still on the meta device. "
            "Non-persistent buffers must be recomputed by an `_init_buffers(self, device)` method on the module "
            "that owns them (called by the loader after the weights are assigned)."
        )
    return module
