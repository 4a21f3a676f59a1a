"""What a ``transformers`` component folder must hold before transformers is asked to read it.

transformers builds a tokenizer from whatever it finds: an emptied ``tokenizer/`` folder gives a
2-token vocabulary and a different picture, without a warning. So each folder is checked first, for the
layouts transformers itself reads, and an incomplete one is an error naming the folder and the missing
files:

* a tokenizer: ``tokenizer.json``, or the files of its class's slow format (``vocab_files_names``:
  ``spiece.model`` for sentencepiece tokenizers, ``vocab.json`` + ``merges.txt`` for byte-level BPE);
* an image processor: ``preprocessor_config.json``, or ``processor_config.json`` with the settings
  under ``image_processor`` (transformers 5 writes that);
* a model (text / image encoder): ``config.json`` (the weights are checked by ``find_weight_files``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..errors import LoaderError, MissingFileError

TOKENIZER_JSON = "tokenizer.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def _present(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _found(folder: Path) -> str:
    names = _present(folder)
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


def _missing(folder: Path, what: str, alternatives: Iterable[Iterable[str]]) -> MissingFileError:
    options = " or ".join(" + ".join(group) for group in alternatives)
    return MissingFileError(f"{what} folder {folder} is incomplete: it needs {options} (found: {_found(folder)}); "
                            "the download or copy is incomplete, fetch the model again")


def slow_tokenizer_files(cls: type) -> list[str]:
    """The files of a tokenizer class's non-``tokenizer.json`` layout (empty when it has none)."""
    names = getattr(cls, "vocab_files_names", None) or {}
    return [name for key, name in names.items() if key != "tokenizer_file" and name != TOKENIZER_JSON]


def _named_tokenizer_class(folder: Path):
    """The class ``tokenizer_config.json`` names (for ``AutoTokenizer`` entries), or None."""
    import transformers

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) else None


def check_tokenizer_folder(folder: Path, cls: type, what: str) -> None:
    folder = Path(folder)
    present = set(_present(folder))
    if TOKENIZER_JSON in present:
        return
    if not getattr(cls, "vocab_files_names", None):  # AutoTokenizer: the class tokenizer_config.json names
        cls = _named_tokenizer_class(folder) or cls
    slow = slow_tokenizer_files(cls)
    if slow and all(name in present for name in slow):
        if any(name.endswith(".model") for name in slow):
            _require_sentencepiece(folder, what)
        return
    raise _missing(folder, what, [[TOKENIZER_JSON]] + ([slow] if slow else []))


def _require_sentencepiece(folder: Path, what: str) -> None:
    """transformers 5 converts a sentencepiece file with ``sentencepiece`` and ``protobuf``; without them
    it falls back to a tiktoken reader and fails with an unrelated message."""
    missing = []
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise LoaderError(f"{what} folder {folder} holds a sentencepiece model but no tokenizer.json; "
                          f"reading it needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def has_image_processor(folder: Path) -> bool:
    folder = Path(folder)
    if (folder / IMAGE_PROCESSOR_FILE).is_file():
        return True
    try:
        data = json.loads((folder / PROCESSOR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("image_processor"), dict)


def check_image_processor_folder(folder: Path, what: str) -> None:
    if not has_image_processor(folder):
        raise _missing(Path(folder), what, [[IMAGE_PROCESSOR_FILE], [f"{PROCESSOR_FILE} (with an image_processor entry)"]])


def check_model_folder(folder: Path, what: str) -> None:
    if not (Path(folder) / "config.json").is_file():
        raise _missing(Path(folder), what, [["config.json"]])


def check_transformers_folder(folder: Path, cls: type, what: str) -> None:
    """Dispatch on the transformers class: tokenizer, image processor / processor, or model."""
    import transformers

    if issubclass(cls, transformers.PreTrainedTokenizerBase) or cls.__name__ == "AutoTokenizer":
        check_tokenizer_folder(folder, cls, what)
    elif issubclass(cls, transformers.PreTrainedModel):
        check_model_folder(folder, what)
    elif issubclass(cls, transformers.ImageProcessingMixin) or cls.__name__ == "AutoImageProcessor":
        check_image_processor_folder(folder, what)
