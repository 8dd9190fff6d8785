"""A persistent store of compressed contexts: SQLite metadata + one safetensors file per context.

Layout of a store directory::

    index.sqlite3            one row per context (WAL journal, synchronous=FULL)
    blobs/<id>.safetensors   the soft tokens, written by :meth:`Compressed.save`
    .lock                    held (flock) by the one process that has the store open

Crash safety: a context is written blob first (temp file + rename, fsync'd), then its row is
committed in one SQLite transaction; it is deleted row first, then blob (a blob that cannot be
removed then is an orphan: the row decides whether a context exists). A damaged blob is
repaired by :meth:`ContextStore.repair` (new blob by rename, then the row's checksum). So a crash or
``kill -9`` at any moment leaves every row pointing at a complete blob; the only possible
leftovers are blobs (or temp files) that no row names, and :meth:`ContextStore.__init__`
removes them.

Ids are content addresses: the same text, compressed at the same rate by the same backbone
and checkpoint, always gets the same id, so storing it again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..checkpoint import file_sha256
from ..compressed import Compressed, IncompatibleContextError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)
INDEX_NAME = "index.sqlite3"
BLOB_DIR = "blobs"
LOCK_NAME = ".lock"
SCHEMA_VERSION = 1
ID_HEX_CHARS = 32
SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", dict: "TEXT"}  # a dict is stored as JSON text


class StoreError(RuntimeError):
    """The store cannot be opened or an entry does not match what was written."""


class StoreLockedError(StoreError):
    """Another process has this store open."""


@dataclass
class ContextRecord:
    """Metadata of one stored compressed context: one row of the index, and what the API shows of it.

    These fields are the one list of the record: the SQL table (:func:`table_schema`) and the API's
    ``ContextInfo`` (:mod:`gmsa.serving.schemas`) are made from them.
    """

    id: str
    content_sha256: str
    backbone: str
    backbone_fingerprint: str
    checkpoint_id: str
    gmsa_version: str
    rate: int
    n_tokens: int
    n_soft_tokens: int
    hidden_size: int
    dtype: str
    blob_sha256: str
    blob_bytes: int
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Context tokens per soft token."""
        return self.n_tokens / max(1, self.n_soft_tokens)

    def to_dict(self) -> dict:
        return asdict(self) | {"compression_ratio": round(self.compression_ratio, 4)}


def record_types() -> dict[str, type]:
    """Each field of :class:`ContextRecord` and its type (``dict[str, Any]`` for the metadata)."""
    return typing.get_type_hints(ContextRecord)


def table_schema() -> str:
    """``CREATE TABLE`` of the index: a column per record field, the id the primary key."""
    columns = []
    for name, kind in record_types().items():
        sql = SQL_TYPES[typing.get_origin(kind) or kind]
        columns.append(f"{name} {sql} {'PRIMARY KEY' if name == 'id' else 'NOT NULL'}")
    return "CREATE TABLE IF NOT EXISTS contexts (\n    " + ",\n    ".join(columns) + "\n)"


def content_sha256(text: str) -> str:
    """The checksum that identifies a text's content."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_id(text_sha256: str, rate: int, backbone_fingerprint: str, checkpoint_id: str) -> str:
    """The id of ``text`` compressed at ``rate`` by one backbone + checkpoint (stable, content-addressed)."""
    key = "\0".join(["gmsa-context-v1", backbone_fingerprint, checkpoint_id, str(rate), text_sha256])
    return hashlib.sha256(key.encode()).hexdigest()[:ID_HEX_CHARS]


def is_context_id(value: str) -> bool:
    """Whether ``value`` has the shape of a context id (32 lowercase hex digits)."""
    return len(value) == ID_HEX_CHARS and all(c in "0123456789abcdef" for c in value)


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContextStore:
    """Compressed contexts kept on disk, addressed by :func:`context_id`.

    Thread-safe (one lock around every operation); one process at a time (a ``flock``).

    Example::

        store = ContextStore("./gmsa-store")
        record, created = store.put(text_sha, compressed[0], backbone="default")
        store.load(record.id)          # -> Compressed with one text
    """

    def __init__(self, root: str | os.PathLike, lock: bool = True):
        self.root = Path(root)
        self.blob_dir = self.root / BLOB_DIR
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.RLock()
        self._lock_handle = self._acquire_process_lock() if lock else None
        self._db = sqlite3.connect(self.root / INDEX_NAME, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self.removed_orphans = self._remove_orphans()

    # ----------------------------------------------------------------- opening
    def _acquire_process_lock(self):
        handle = open(self.root / LOCK_NAME, "a+")  # noqa: SIM115 - held for the store's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                handle.close()
                raise StoreLockedError(f"{self.root} is in use by another process (gmsa serve?)") from err
        return handle

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.root} was written by a newer gmsa (store schema {version} > {SCHEMA_VERSION})")
        with self._transaction():
            self._db.execute(table_schema())
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _remove_orphans(self) -> int:
        """Delete blobs no row names and temp files left by an interrupted write."""
        known = {row[0] for row in self._db.execute("SELECT id FROM contexts")}
        removed = 0
        for path in self.blob_dir.iterdir():
            if path.name.startswith(".") or path.name.removesuffix(".safetensors") not in known:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        """Close the database and release the process lock."""
        with self._mutex:
            self._db.close()  # closing twice is harmless
            if self._lock_handle is not None:
                self._lock_handle.close()
                self._lock_handle = None

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def blob_path(self, context_id_: str) -> Path:
        if not is_context_id(context_id_):
            raise KeyError(context_id_)
        return self.blob_dir / f"{context_id_}.safetensors"

    def get(self, context_id_: str) -> ContextRecord | None:
        """The record of a stored context, or ``None``."""
        with self._mutex:
            row = self._db.execute("SELECT * FROM contexts WHERE id = ?", (context_id_,)).fetchone()
        return _record(row) if row else None

    def __contains__(self, context_id_: str) -> bool:
        return self.get(context_id_) is not None

    def ids(self) -> list[str]:
        """Every stored id, oldest first."""
        with self._mutex:
            return [row[0] for row in self._db.execute("SELECT id FROM contexts ORDER BY created_at, id")]

    def load(self, context_id_: str, verify: bool = True) -> Compressed:
        """The soft tokens of a stored context (a one-text :class:`Compressed`).

        Raises ``KeyError`` if there is no such context and :class:`StoreError` if its blob does
        not match the checksum recorded when it was written.
        """
        record = self.get(context_id_)
        if record is None:
            raise KeyError(context_id_)
        path = self.blob_path(context_id_)
        if verify and (not path.is_file() or file_sha256(path) != record.blob_sha256):
            raise StoreError(f"context {context_id_}: blob {path} is missing or does not match its checksum")
        try:
            compressed = Compressed.load(path)
        except IncompatibleContextError as err:
            raise StoreError(f"context {context_id_}: {err}") from err
        if compressed.n_soft_tokens != [record.n_soft_tokens]:
            raise StoreError(f"context {context_id_}: blob has {compressed.n_soft_tokens} soft tokens")
        return compressed

    def stats(self) -> dict:
        """Number of contexts and bytes of soft tokens on disk."""
        with self._mutex:
            count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(blob_bytes), 0) FROM contexts").fetchone()
        return {"contexts": count, "blob_bytes": total}

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` when the index is sound)."""
        with self._mutex:
            return "; ".join(row[0] for row in self._db.execute("PRAGMA integrity_check"))

    def verify(self) -> list[str]:
        """Problems found by checking the index and re-reading every blob (empty when intact)."""
        problems = [] if (check := self.integrity_check()) == "ok" else [f"sqlite: {check}"]
        for context_id_ in self.ids():
            try:
                self.load(context_id_, verify=True)
            except (KeyError, StoreError) as err:
                problems.append(str(err))
        return problems

    # ----------------------------------------------------------------- writing
    def put(
        self, text_sha256: str, compressed: Compressed, backbone: str = "", metadata: dict | None = None
    ) -> tuple[ContextRecord, bool]:
        """Store one compressed text; returns its record and whether it was new.

        If the id is already stored, nothing is written and the existing record (with its
        original metadata) is returned.
        """
        if len(compressed) != 1:
            raise ValueError(f"put stores one compressed text at a time, got {len(compressed)}")
        new_id = context_id(text_sha256, compressed.rates[0], compressed.backbone_fingerprint, compressed.checkpoint_id)
        with self._mutex:
            existing = self.get(new_id)
            if existing is not None:
                return existing, False
            path = self._write_blob(new_id, compressed)
            record = _new_record(new_id, text_sha256, compressed, backbone, metadata or {}, path)
            with self._transaction():
                self._insert(record)
        return record, True

    def is_intact(self, context_id_: str) -> bool:
        """Whether a stored context's blob exists and matches the checksum in its row."""
        record = self.get(context_id_)
        if record is None:
            return False
        path = self.blob_path(context_id_)
        return path.is_file() and file_sha256(path) == record.blob_sha256

    def repair(self, text_sha256: str, compressed: Compressed, backbone: str = "") -> ContextRecord:
        """Rewrite the blob of a stored context (its row keeps its metadata and creation time).

        For a context whose blob is damaged: the new blob replaces it atomically, then the row takes
        its checksum. A crash in between leaves the context reported as damaged, to be repaired again.
        """
        new_id = context_id(text_sha256, compressed.rates[0], compressed.backbone_fingerprint, compressed.checkpoint_id)
        with self._mutex:
            existing = self.get(new_id)
            if existing is None:
                return self.put(text_sha256, compressed, backbone)[0]
            path = self._write_blob(new_id, compressed)
            fresh = _new_record(new_id, text_sha256, compressed, existing.backbone, existing.metadata, path)
            record = replace(fresh, created_at=existing.created_at)
            changed = ["gmsa_version", "n_soft_tokens", "hidden_size", "dtype", "blob_sha256", "blob_bytes"]
            assignments = ", ".join(f"{name} = ?" for name in changed)
            with self._transaction():
                values = [getattr(record, name) for name in changed]
                self._db.execute(f"UPDATE contexts SET {assignments} WHERE id = ?", [*values, new_id])
        return record

    def _write_blob(self, context_id_: str, compressed: Compressed) -> Path:
        path = self.blob_path(context_id_)
        compressed.save(path)  # temp file + rename
        _fsync_path(path)
        _fsync_path(self.blob_dir)
        return path

    def delete(self, context_id_: str) -> bool:
        """Remove a context; ``False`` if there was none."""
        with self._mutex:
            with self._transaction():
                deleted = self._db.execute("DELETE FROM contexts WHERE id = ?", (context_id_,)).rowcount
            if deleted:  # the row is gone: the context is deleted even if its file cannot be removed now
                try:
                    self.blob_path(context_id_).unlink(missing_ok=True)
                except OSError as err:  # removed with the orphans the next time the store is opened
                    log.warning("context %s deleted; its blob stays until the store is reopened: %s", context_id_, err)
        return bool(deleted)

    def _insert(self, record: ContextRecord) -> None:
        values = asdict(record) | {"metadata": json.dumps(record.metadata, sort_keys=True)}
        columns, marks = ", ".join(values), ", ".join("?" * len(values))
        self._db.execute(f"INSERT INTO contexts ({columns}) VALUES ({marks})", list(values.values()))

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _new_record(
    new_id: str, text_sha256: str, compressed: Compressed, backbone: str, metadata: dict, path: Path
) -> ContextRecord:
    tokens = compressed.soft_tokens[0]
    return ContextRecord(
        id=new_id,
        content_sha256=text_sha256,
        backbone=backbone,
        backbone_fingerprint=compressed.backbone_fingerprint,
        checkpoint_id=compressed.checkpoint_id,
        gmsa_version=compressed.gmsa_version,
        rate=compressed.rates[0],
        n_tokens=compressed.n_tokens[0],
        n_soft_tokens=int(tokens.shape[0]),
        hidden_size=int(tokens.shape[-1]),
        dtype=str(tokens.dtype).removeprefix("torch."),
        blob_sha256=file_sha256(path),
        blob_bytes=path.stat().st_size,
        created_at=time.time(),
        metadata=metadata,
    )


def _record(row: sqlite3.Row) -> ContextRecord:
    values = dict(row)
    values["metadata"] = json.loads(values["metadata"])
    return ContextRecord(**values)
