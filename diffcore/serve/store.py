"""The server's durable state: one SQLite database (stdlib sqlite3, WAL) and the files beside it, in a state
folder that one server owns at a time.

    STATE_DIR/lock        held (flock) by the server using the folder: a second server is refused
    STATE_DIR/state.db    the tables: kept files (``url`` images, videos, thumbnails) and video jobs
    STATE_DIR/files/      the files, under random server-made names

What must outlive the process lives here and nowhere else (DESIGN.md section 8). Rows are written before a
file is announced and files are written under a temporary name then renamed, so a SIGKILL leaves at worst
an unreferenced file, which the next start deletes.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, media_type TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, record TEXT NOT NULL);
"""


class StateFolderInUse(ConfigError):
    """Another server holds the state folder's lock."""


def default_state_dir(port: int) -> Path:
    """``$DIFFCORE_STATE_HOME/port-PORT``, else the user's cache (``$XDG_CACHE_HOME`` or ~/.cache)
    ``/diffcore/serve/port-PORT``: one folder per port, so servers on other ports never share one."""
    home = os.environ.get("DIFFCORE_STATE_HOME")
    if not home:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(cache, "diffcore", "serve")
    return Path(home) / f"port-{port}"


def _lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` held while the returned file stays open (the kernel drops
    it when the process dies, SIGKILL included, so a crash never leaves the folder locked)."""
    import fcntl

    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StateFolderInUse(
            f"state folder {str(path.parent)!r} is in use by {holder}; two servers cannot share one: give this one "
            "its own --state-dir (or stop the other)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"diffcore serve (pid {os.getpid()})\n")
    handle.flush()
    return handle


class StateStore:
    """The database and the files folder. ``StateStore(None)`` is a private temporary folder deleted on
    close (``create_app`` without a state folder: nothing outlives the process)."""

    def __init__(self, root: Optional[str | Path]):
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="diffcore-serve-")) if root is None else Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the state folder {str(self.root)!r}: {exc.strerror}; "
                              "pick another with --state-dir") from None
        self._lock_handle = _lock(self.root / "lock")
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(exist_ok=True, mode=0o700)
        self._mutex = threading.Lock()
        try:
            self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(f"state folder {str(self.root)!r} was written by a newer diffcore (schema {version}); "
                                  "upgrade diffcore or use another --state-dir")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._lock_handle.close()
            raise ConfigError(f"the state database in {str(self.root)!r} cannot be opened ({exc}); "
                              "move the folder away or use another --state-dir") from None

    def execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._mutex:
            return self._db.execute(sql, args).fetchall()

    # files ----------------------------------------------------------------------------------------------
    def add_file(self, file_id: str, name: str, media_type: str, created_at: float, expires_at: float) -> None:
        self.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", (file_id, name, media_type, created_at, expires_at))

    def file(self, file_id: str) -> Optional[tuple[str, str, float]]:
        rows = self.execute("SELECT name, media_type, expires_at FROM files WHERE id = ?", (file_id,))
        return rows[0] if rows else None

    def drop_file(self, file_id: str) -> None:
        with self._mutex:  # (no DELETE ... RETURNING: SQLite before 3.35 lacks it)
            rows = self._db.execute("SELECT name FROM files WHERE id = ?", (file_id,)).fetchall()
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        for (name,) in rows:
            (self.files_dir / name).unlink(missing_ok=True)

    def expired_files(self, now: float) -> list[str]:
        return [r[0] for r in self.execute("SELECT id FROM files WHERE expires_at <= ?", (now,))]

    def remove_orphans(self) -> int:
        """Delete files no row names (a write cut short by a crash); returns how many."""
        known = {r[0] for r in self.execute("SELECT name FROM files")}
        orphans = [p for p in self.files_dir.iterdir() if p.name not in known]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    # video jobs -----------------------------------------------------------------------------------------
    def save_video(self, job_id: str, record: dict) -> None:
        self.execute("INSERT INTO videos (id, record) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                     (job_id, json.dumps(record)))

    def drop_video(self, job_id: str) -> None:
        self.execute("DELETE FROM videos WHERE id = ?", (job_id,))

    def videos(self) -> list[dict]:
        """Every job record, oldest first."""
        return [json.loads(r[0]) for r in self.execute("SELECT record FROM videos ORDER BY seq")]

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        self._lock_handle.close()
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
