"""Results kept for a while and served back by id: `url` images and finished videos.

Files live in a private temporary folder under server-made names; a request names a file only by its
random id, which is looked up in a table, so no request can point the server at a path.
"""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import attrs

ID = re.compile(r"^[0-9a-f]{32}$")


@attrs.define
class StoredFile:
    path: Path
    media_type: str
    expires: float


class FileStore:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self.root = Path(tempfile.mkdtemp(prefix="diffcore-serve-"))
        self._files: dict[str, StoredFile] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, suffix: str) -> str:
        return self.write(lambda path: path.write_bytes(data), media_type, suffix)

    def write(self, writer, media_type: str, suffix: str) -> str:
        """Store what ``writer(path)`` writes at a server-made path; returns the file's id."""
        self.sweep()
        file_id = secrets.token_hex(16)
        path = self.root / f"{file_id}{suffix}"
        writer(path)
        with self._lock:
            self._files[file_id] = StoredFile(path, media_type, time.monotonic() + self.ttl)
        return file_id

    def get(self, file_id: str) -> Optional[StoredFile]:
        if not ID.match(file_id):
            return None
        self.sweep()
        with self._lock:
            return self._files.get(file_id)

    def remove(self, file_id: str) -> None:
        with self._lock:
            entry = self._files.pop(file_id, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [k for k, v in self._files.items() if v.expires <= now]
        for file_id in expired:
            self.remove(file_id)

    def close(self) -> None:
        with self._lock:
            self._files.clear()
        shutil.rmtree(self.root, ignore_errors=True)
