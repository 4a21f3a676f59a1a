"""Every file a model folder refers to stays inside that folder.

Why: a model folder is data from the internet. Its JSON files name other files (a sharded index's
``weight_map``), and its entries may be symbolic links; followed blindly,
``"../../outside/x.safetensors"``, ``"/etc/passwd"`` or a link to ``~/.ssh`` make diffcore read files the
folder's author chose anywhere on the machine. So a name a folder gives must be relative, without
``..``; and every entry of the folder must resolve (``realpath``) inside it. Links leaving the folder are
refused unless the user allows them (``allow_external_links=True``, CLI ``--allow-external-links``), e.g.
for component folders linked in from another checkout. A Hugging Face cache snapshot is the exception the
rule is built for: its files are links into the repo's own ``blobs/`` folder, which counts as inside.
Tokenizer and processor files are read by transformers under fixed names (it ignores the file paths a
``tokenizer_config.json`` holds), so for them the link check is the whole rule.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from ..errors import ConfigError, UnsafePathError

LINKS_HINT = ("if you put that link there on purpose, allow links out of the folder with allow_external_links=True "
              "(CLI: --allow-external-links)")


def explicit_bool(name: str, value) -> bool:
    """A yes/no that opens a door (unpickling, following links) must be a real ``True``: ``"no"`` is not."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def roots(folder: Path) -> list[Path]:
    """Where a folder's entries may resolve: the folder, and for a Hub cache snapshot the repo's ``blobs/``."""
    folder = Path(folder)
    found = [Path(os.path.realpath(folder))]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        found.append(Path(os.path.realpath(folder.parent.parent / "blobs")))
    return found


def _within(path: Path, allowed: Iterable[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in allowed)


def check_name(folder: Path, name, *, source, entry: str) -> Path:
    """``folder / name`` for a file name that ``source`` (a JSON file) gives in ``entry``; refused unless the
    name is relative, has no ``..`` and resolves inside ``folder``."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{source}: {entry} must be a file name inside {folder}, got {name!r}",
                              file=source, entry=entry)
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(f"{source}: {entry} names {name!r}, a path outside the model folder {folder}; a model "
                              "folder may only refer to its own files (relative names without '..'). The folder "
                              "was edited or crafted: do not load it", file=source, entry=entry)
    path = Path(folder) / name
    if not _within(path, roots(folder)):
        raise UnsafePathError(f"{source}: {entry} names {name!r}, which resolves to {os.path.realpath(path)}, outside "
                              f"the model folder {folder}; {LINKS_HINT}", file=source, entry=entry)
    return path


def check_folder(folder: Path, *, allow_external_links: bool = False) -> None:
    """Refuse a folder with an entry (file or folder, at any depth) that resolves outside it."""
    explicit_bool("allow_external_links", allow_external_links)
    if allow_external_links:
        return
    folder = Path(folder)
    allowed = roots(folder)
    for top, dirs, files in os.walk(folder):  # links are not followed: each one is checked here instead
        for name in (*dirs, *files):
            path = Path(top) / name
            if path.is_symlink() and not _within(path, allowed):
                raise UnsafePathError(
                    f"{path} is a link to {os.path.realpath(path)}, outside the model folder {folder}; a model folder "
                    f"may only refer to its own files; {LINKS_HINT}", file=path, entry=str(path.relative_to(folder)))
