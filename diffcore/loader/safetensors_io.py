"""Assign weights into a module built on the meta device (dtype rules, layout conversion, mismatch reports).

Finding the files is ``weight_files``, reading them ``weight_reading``."""
from __future__ import annotations

import contextlib
import logging
import mmap
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import LoaderError, WeightMismatchError
from ..finite import check_weight
from ..memory import release_pages
from . import key_layouts as _layouts
from .weight_files import few_names
from .weight_reading import all_keys, open_weights

log = logging.getLogger(__name__)


KeyMap = Callable[[str], "str | None"]

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
        parts.append(f"{len(missing)} missing keys (in the module, not in the checkpoint): {few_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not in the module): {few_names(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {few_names(mismatched)}")
    if duplicated:
        parts.append(f"{len(duplicated)} keys given twice: {few_names(duplicated)}")
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
    every = all_keys(files, pickle_cache) if layouts and len(files) > 1 else None  # shards share one layout
    # Pass 1: headers only. Map names, find duplicates, missing/unexpected keys, shape mismatches.
    plan: dict[str, tuple[Path, str]] = {}  # module name -> (file, checkpoint key)
    unexpected, mismatched, duplicated = [], [], []
    seen: dict[Path, _layouts.CheckpointLayout | None] = {}
    for path in files:
        with open_weights(path, pickle_cache) as file:
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
        log.warning("%s: ignoring %d unexpected checkpoint keys: %s", type(module).__name__, len(unexpected), few_names(unexpected))
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
        with open_weights(path, pickle_cache) as file:
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
            f"{type(module).__name__}: tensors {few_names(left)} are not in {', '.join(str(f) for f in files)} and are "
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
