"""Find a component's weight files: safetensors (plain, sharded, precision variants) or, on explicit opt-in,
pickle files."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import CorruptCheckpointError, MissingFileError, PickleRefusedError
from .containment import check_name, explicit_bool
from .model_index import read_json
from .weight_reading import open_safetensors

log = logging.getLogger(__name__)

SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_LISTED = 10



def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


def few_names(items: Sequence[str]) -> str:
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
            with open_safetensors(shard) as f:
                present = set(f.keys())
            absent = [k for k in keys if k not in present]
            if absent:
                raise CorruptCheckpointError(
                    f"{index} places {len(absent)} tensors in {shard}, which does not contain them: {few_names(absent)}; "
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
