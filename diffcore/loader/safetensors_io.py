"""Find a component's weight files and assign them into a module built on the meta device.

Safetensors files are memory-mapped: a tensor whose dtype already matches and that stays on the CPU
becomes the module's parameter as-is (a view into the file mapping, no copy). Pickle files
(``.bin``/``.pt``/``.ckpt``) are read only on explicit opt-in, with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import re
import sys
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CorruptCheckpointError, LoaderError, MissingFileError, PickleRefusedError, WeightMismatchError
from ..finite import check_weight
from ..memory import map_file, release_pages
from . import key_layouts as _layouts
from .containment import check_name, explicit_bool
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
        if not isinstance(shard, str):
            check_name(index.parent, shard, source=index, entry=f"weight_map[{key!r}]")  # raises: not a file name
        by_shard.setdefault(shard, []).append(key)
    shards = []
    for name, keys in by_shard.items():
        shard = check_name(index.parent, name, source=index, entry=f"weight_map[{keys[0]!r}]")
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


# diffusers / transformers weight names with a variant: model.fp16.safetensors, shards
# model.fp16-00001-of-00002.safetensors (and the legacy model-00001-of-00002.fp16.safetensors).
_VARIANT_FILE = re.compile(r"(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors")


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (diffusers' and transformers' variant naming;
    an index becomes ``model.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def _variant_files(folder: Path, variant: str) -> list[Path] | None:
    for name in SAFETENSORS_NAMES:
        if (folder / add_variant(name, variant)).is_file():
            return [folder / add_variant(name, variant)]
    indexes = sorted(folder.glob(f"*.safetensors.index.{variant}.json"))
    return _sharded(indexes[0], check_keys=True) if indexes else None


def variants_in(folder: Path) -> list[str]:
    """Precision variants a component folder holds (``fp16`` for ``model.fp16.safetensors``)."""
    found = set()
    for path in (Path(folder).glob("*.safetensors") if Path(folder).is_dir() else ()):
        match = _VARIANT_FILE.fullmatch(path.name)
        if match:
            found.add(match.group(1))
    return sorted(found)


def check_variant(folder: Path, components: Iterable[str], variant: str) -> None:
    """diffusers' rule: ``variant=`` needs the variant's weights in at least one component folder
    (components without them use their plain weights)."""
    found = {name: variants_in(Path(folder) / name) for name in components}
    if not any(variant in v for v in found.values()):
        others = sorted({v for vs in found.values() for v in vs})
        offer = f"it holds {', '.join(others)}" if others else "it holds no precision variants"
        raise MissingFileError(f"variant={variant!r}: no component of {folder} has *.{variant}.safetensors weights "
                               f"({offer}); leave variant unset to load the plain weights")


def find_weight_files(folder: Path, allow_pickle: bool = False, variant: str | None = None) -> list[Path]:
    """The weight files of one component folder, safetensors preferred.

    Order of preference: with ``variant`` (as in diffusers), that variant's files
    (``diffusion_pytorch_model.<variant>.safetensors``, ``model.<variant>.safetensors`` or a
    ``*.safetensors.index.<variant>.json``), falling back to the plain files for a component that has
    none; ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``; a sharded
    ``*.safetensors.index.json``; pickle files, which raise :class:`PickleRefusedError` unless
    ``allow_pickle`` is exactly True.
    """
    explicit_bool("allow_pickle", allow_pickle)
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"component folder {folder} does not exist")
    if variant:
        files = _variant_files(folder, variant)
        if files is not None:
            return files
        log.info("%s has no %s variant weights; using its plain weights (as diffusers does)", folder, variant)
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
    hint = ""
    others = [v for v in variants_in(folder) if v != variant]
    if others:
        hint = (f"; the folder holds precision-variant weights ({', '.join(others)}): load them with "
                f"variant={others[0]!r} (CLI: --variant {others[0]})")
    raise MissingFileError(
        f"no weights in {folder}: expected {' or '.join(SAFETENSORS_NAMES)}, or a sharded "
        f"*.safetensors.index.json with its shards (found: {_listing(folder)}){hint}"
    )


def check_pickle_consent(files: Sequence[Path], allow_pickle: bool, what: str) -> None:
    """A weight file given by path (``gguf=``, a single file) that is not .gguf / .safetensors would be
    unpickled: the same explicit ``allow_pickle=True`` as a folder's pickle weights."""
    pickles = [str(f) for f in files if Path(f).suffix not in (".gguf", ".safetensors")]
    if pickles and explicit_bool("allow_pickle", allow_pickle) is not True:
        raise PickleRefusedError(
            f"{what}: {', '.join(pickles)} is not a .gguf or .safetensors file, so reading it means unpickling it, "
            "which can run code hidden in the file. If you trust the source, opt in with allow_pickle=True "
            "(CLI: --allow-pickle), or convert the weights to safetensors."
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
def _open(path: Path, pickle_cache: dict) -> Iterator[_Reader]:
    if path.suffix == ".gguf":  # quantized tensors stay packed (see gguf_io)
        from .gguf_io import GGUFFile

        f = GGUFFile(path)
        yield _Reader(f.keys, f.shape, f.tensor)
        return
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            views = _SafetensorsViews(path, f)
            yield _Reader(list(f.keys()), views.shape, views.tensor)
        return
    if path not in pickle_cache:  # read once for both passes
        pickle_cache[path] = _torch_load(path)
    sd = pickle_cache[path]
    yield _Reader(list(sd), lambda k: tuple(sd[k].shape), sd.__getitem__)


def _all_keys(files: Sequence[Path], pickle_cache: dict) -> list[str]:
    """Every shard's tensor names (headers only), to choose one checkpoint layout for all shards."""
    keys: list[str] = []
    for path in files:
        with _open(path, pickle_cache) as reader:
            keys.extend(reader.keys)
    return keys


def file_keys(path: Path) -> list[str]:
    """The tensor names of one weight file (headers only; pickle files are not opened for this)."""
    path = Path(path)
    if path.suffix not in (".gguf", ".safetensors") or not path.is_file():
        return []
    with _open(path, {}) as reader:
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


# ---- loading ----------------------------------------------------------------------------------

DtypeRule = Callable[[str, torch.Tensor, torch.Tensor], torch.dtype]
OnModule = Callable[[nn.Module], None]
POPULATE_MIN_BYTES = 1 << 20


class _SkipInitMode(TorchFunctionMode):
    """In-place ops on meta tensors (what ``torch.nn.init``'s initialisers come down to) return at once."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (args and isinstance(args[0], torch.Tensor) and args[0].is_meta
                and getattr(func, "__name__", "").endswith("_") and not getattr(func, "__name__", "").startswith("_")):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip weight initialisation while a module is built on the meta device, in this thread only.

    Every weight is then assigned from the checkpoint, so initialising is wasted work, and on meta
    tensors it is slow: each ``uniform_``/``normal_`` runs a Python decomposition (about 2/3 of the
    build time of a transformer). A torch-function mode (a per-thread stack, nothing patched) turns
    every public in-place op on a meta tensor into a no-op; real tensors are untouched, so other
    threads, and real tensors built inside, initialise as usual.
    """
    with _SkipInitMode():
        yield


def _keep_fp32(name: str, modules: Sequence[str]) -> bool:
    parts = name.split(".")
    return any(m in parts for m in modules)


def diffusers_dtype_rule(module: nn.Module, dtype: torch.dtype | None) -> DtypeRule:
    """Diffusers' rule: floating tensors to ``dtype`` (``None``: as saved), float32 under ``_keep_in_fp32_modules``."""
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])

    def rule(name: str, saved: torch.Tensor, expected: torch.Tensor) -> torch.dtype:
        if dtype is None or not saved.is_floating_point():
            return saved.dtype
        return torch.float32 if keep and _keep_fp32(name, keep) else dtype

    return rule


def _materialise_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        hook = getattr(sub, "_init_buffers", None)
        if callable(hook) and any(b.is_meta for b in sub.buffers()):
            hook(device)


def _layout_hint(module, layouts, seen) -> str:
    if not layouts:
        return ""
    read_as = sorted({f"{path.name} as {layout.name}" for path, layout in seen.items() if layout is not None})
    if read_as:
        return f" Read {', '.join(read_as)}."
    return (f" The keys match none of the checkpoint layouts {type(module).__name__} reads "
            f"({_layouts.layout_names(layouts)}).")


def _mismatch_error(module, files, missing, unexpected, mismatched, duplicated, hint_layouts="") -> WeightMismatchError:
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
    where = ", ".join(str(f) for f in files)
    err = WeightMismatchError(f"weights in {where} do not fit {type(module).__name__}: " + "; ".join(parts) + "."
                              + hint_layouts + hint)
    err.missing, err.unexpected, err.mismatched, err.files = missing, unexpected, mismatched, files
    return err


def _converted(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t.to(device, dtype)``; on the CPU, large results go to memory mapped with ``MAP_POPULATE``.

    Converting is bound by page faults on fresh memory; populating a whole mapping in one call is
    cheaper than faulting it in page by page (fp32 -> bf16 of a 330 MB transformer here: 0.14 -> 0.12 s
    on a quiet machine, 0.30 -> 0.23 s on a busy one). One mapping per tensor, so each is freed on its
    own. Transparent huge pages were tried too: 0.06-0.64 s, too erratic.
    """
    nbytes = t.numel() * dtype.itemsize
    if device.type != "cpu" or nbytes < POPULATE_MIN_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return t.to(device=device, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return torch.frombuffer(buf, dtype=dtype).view(t.shape).copy_(t)  # the tensor keeps the mapping alive


def _assign_one(module: nn.Module, owners: dict[str, nn.Module], name: str, t: torch.Tensor) -> nn.Module:
    """Put one tensor in place (what ``load_state_dict(assign=True)`` does, without its per-module walk);
    returns the submodule that owns it (``owners`` caches them by prefix)."""
    prefix, _, attr = name.rpartition(".")
    owner = owners.get(prefix)
    if owner is None:
        owner = owners[prefix] = module.get_submodule(prefix) if prefix else module
    old = owner._parameters.get(attr)
    if old is not None:
        owner._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    elif attr == "_extra_state":  # a module's get_extra_state() value, saved as a tensor
        owner.set_extra_state(t)
    else:
        owner._buffers[attr] = t
    return owner


def assign_weights(
    module: nn.Module,
    files: Sequence[Path],
    dtype_rule: DtypeRule,
    key_map: KeyMap | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    optional: Collection[str] = (),
    layouts: Sequence[_layouts.CheckpointLayout] | None = None,
    on_module: OnModule | None = None,
) -> list[str]:
    """Check the checkpoint against ``module.state_dict()``, then assign its tensors (see ``load_into_module``).

    ``dtype_rule(name, saved, expected)`` gives each tensor's dtype. Names in ``optional`` may be absent
    from the checkpoint (e.g. tied weights the caller fills in); the absent ones are returned.
    ``layouts`` (default: the module class's ``checkpoint_layouts``) convert files in a model's original
    key layout; ``key_map`` then applies to the converted names.
    ``on_module(submodule)`` is called for each submodule as soon as all its checkpoint tensors are in
    place, before the next tensor is read: e.g. to quantize a layer while only its own full-precision
    weight exists (``diffcore.quantization``).
    """
    if layouts is None:
        layouts = tuple(getattr(type(module), "checkpoint_layouts", ()))
    files = [Path(f) for f in files]
    if not files:
        raise LoaderError(f"no weight files given for {type(module).__name__}")
    device = torch.device(device)
    expected = module.state_dict(keep_vars=True)

    pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
    every = _all_keys(files, pickle_cache) if layouts and len(files) > 1 else None  # shards share one layout
    # Pass 1: headers only. Map names, find duplicates, missing/unexpected keys, shape mismatches.
    plan: dict[str, tuple[Path, str]] = {}  # module name -> (file, checkpoint key)
    unexpected, mismatched, duplicated = [], [], []
    seen: dict[Path, _layouts.CheckpointLayout | None] = {}
    for path in files:
        with _open(path, pickle_cache) as file:
            reader = file.through(layouts, every)
            seen[path] = reader.layout
            if reader.layout is not None and reader.layout.convert is not None:
                log.info("%s: reading %s as the %s layout", type(module).__name__, path.name, reader.layout.name)
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
    absent = [n for n in expected if n not in plan]
    missing = [n for n in absent if n not in optional and (strict or expected[n].is_meta)]
    if not strict and unexpected:
        log.warning("%s: ignoring %d unexpected checkpoint keys: %s", type(module).__name__, len(unexpected), _few(unexpected))
        unexpected = []
    if missing or unexpected or mismatched or duplicated:
        raise _mismatch_error(module, files, missing, unexpected, mismatched, duplicated,
                              _layout_hint(module, layouts, seen))

    # Pass 2: read tensors (mmapped views); convert only where dtype or device differ. Each tensor is put
    # in place at once, and ``on_module`` sees each submodule as soon as its last tensor is in.
    by_file: dict[Path, list[tuple[str, str]]] = {}
    pending: dict[str, int] = {}  # submodule prefix -> its tensors not yet assigned
    for name, (path, key) in plan.items():
        if name in expected:
            by_file.setdefault(path, []).append((name, key))
            prefix = name.rpartition(".")[0]
            pending[prefix] = pending.get(prefix, 0) + 1
    owners: dict[str, nn.Module] = {}
    for path, pairs in by_file.items():
        with _open(path, pickle_cache) as file:
            reader = file.through(layouts, every)
            for name, key in pairs:
                t = reader.tensor(key)
                target = dtype_rule(name, t, expected[name])
                if t.dtype != target or t.device != device:
                    source, t = t, _converted(t, target, device)
                    release_pages(source)  # the file's pages of a converted tensor are not needed again
                check_weight(name, t, path)  # a NaN weight would make every picture black
                if expected[name].is_floating_point() and not t.is_floating_point() and type(t) is torch.Tensor:
                    raise WeightMismatchError(f"weight {name!r} in {path} is {t.dtype}, but {type(module).__name__} "
                                              "needs floating-point values there: the file is corrupt or was converted "
                                              "wrongly; re-download or convert it again")
                owner = _assign_one(module, owners, name, t)
                prefix = name.rpartition(".")[0]
                pending[prefix] -= 1
                if not pending[prefix] and on_module is not None:
                    on_module(owner)
                del t
    return [n for n in absent if n in optional]


def check_materialised(module: nn.Module, files: Sequence[Path]) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise LoaderError(
            f"{type(module).__name__}: tensors {_few(left)} are not in {', '.join(str(f) for f in files)} and are "
            "still on the meta device. Non-persistent buffers must be recomputed by an `_init_buffers(self, device)` "
            "method on the module that owns them (called by the loader after the weights are assigned)."
        )


def load_into_module(
    module: nn.Module,
    files: Sequence[Path],
    key_map: KeyMap | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    layouts: Sequence[_layouts.CheckpointLayout] | None = None,
    on_module: OnModule | None = None,
) -> nn.Module:
    """Assign the tensors of ``files`` into ``module`` (normally built on the meta device).

    - ``key_map`` renames each checkpoint key to a parameter name; returning ``None`` drops the key.
    - ``dtype`` converts floating-point tensors (integer/bool ones keep theirs); ``None`` keeps the
      checkpoint's dtype. As in Diffusers, floating tensors under a module named in the class
      attribute ``_keep_in_fp32_modules`` stay float32. A tensor already in the right dtype on
      the CPU is not copied: the parameter is a view of the memory-mapped file.
    - ``layouts`` (default: ``type(module).checkpoint_layouts``): a file whose keys match one of them
      (e.g. a model's original layout) is converted to the module's names first (see ``key_layouts.py``).
    - Every key, name and shape is checked against ``module.state_dict()`` before any data is
      read; problems raise one :class:`WeightMismatchError` listing them. ``strict=False`` ignores
      unexpected keys and tolerates missing ones that the module already holds off the meta device.
    - Buffers that are not saved (``persistent=False``, e.g. precomputed tables) are still on the
      meta device after loading. Convention: a module (root or submodule) that owns such buffers
      defines ``_init_buffers(self, device: torch.device) -> None``, which recomputes them on
      ``device``; it is called for every module whose buffers are still on meta. Anything left on
      meta afterwards is an error naming the tensors.
    - ``on_module`` sees each submodule as soon as its tensors are in place (see ``assign_weights``).
    """
    assign_weights(module, files, diffusers_dtype_rule(module, dtype), key_map=key_map, device=device, strict=strict,
                   layouts=layouts, on_module=on_module)
    _materialise_buffers(module, torch.device(device))
    check_materialised(module, files)
    return module
