"""Results kept for a while and served back by id: `url` images, finished videos and their previews.

Files live in the state folder (store.py) under server-made names; a request names a file only by its
random id, which is looked up in the database, so no request can point the server at a path. Each file
expires ``ttl`` seconds after it was written (wall-clock time, so expiry survives a restart).
"""
from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Optional

import attrs

from .store import StateStore

ID = re.compile(r"^[0-9a-f]{32}$")


@attrs.define
class StoredFile:
    path: Path
    media_type: str
    expires_at: float


class FileStore:
    def __init__(self, store: StateStore, ttl: float):
        self.store, self.ttl = store, ttl

    def put(self, data: bytes, media_type: str, suffix: str) -> str:
        return self.write(lambda path: path.write_bytes(data), media_type, suffix)

    def write(self, writer, media_type: str, suffix: str) -> str:
        """Store what ``writer(path)`` writes at a server-made path; returns the file's id. The file gets its
        final name only once complete, and is announced (its row) only after that."""
        file_id = secrets.token_hex(16)
        name = f"{file_id}{suffix}"
        partial = self.store.files_dir / f"{file_id}.partial{suffix}"  # the writer may go by the suffix
        try:
            writer(partial)
            partial.replace(self.store.files_dir / name)
        finally:
            partial.unlink(missing_ok=True)
        now = time.time()
        self.store.add_file(file_id, name, media_type, now, now + self.ttl)
        return file_id

    def get(self, file_id: str) -> Optional[StoredFile]:
        if not isinstance(file_id, str) or not ID.match(file_id):
            return None
        row = self.store.file(file_id)
        if row is None:
            return None
        name, media_type, expires_at = row
        if expires_at <= time.time():
            self.remove(file_id)
            return None
        path = self.store.files_dir / name
        return StoredFile(path, media_type, expires_at) if path.is_file() else None

    def remove(self, file_id: str) -> None:
        self.store.drop_file(file_id)

    def sweep(self) -> int:
        """Delete every expired file and its row; returns how many."""
        expired = self.store.expired_files(time.time())
        for file_id in expired:
            self.remove(file_id)
        return len(expired)
