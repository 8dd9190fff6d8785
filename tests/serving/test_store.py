"""The compressed-context store: content addressing, persistence, crash safety."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gmsa.compressed import Compressed
from gmsa.serving.store import (
    INDEX_NAME,
    ContextStore,
    StoreError,
    StoreLockedError,
    content_sha256,
    context_id,
    is_context_id,
)

REPO = Path(__file__).resolve().parents[2]


def soft_tokens(i: int, n: int = 5, hidden: int = 8) -> torch.Tensor:
    """Distinct, reproducible soft tokens for entry ``i`` (the crash-test writer computes the same)."""
    return torch.arange(n * hidden, dtype=torch.float32).reshape(n, hidden) + 1000.0 * i


def one_context(i: int = 0, rate: int = 4, checkpoint: str = "ckpt-a", n: int = 5) -> Compressed:
    return Compressed([soft_tokens(i, n)], [rate], [n * rate], "backbone-fp", checkpoint)


@pytest.fixture
def store(tmp_path):
    with ContextStore(tmp_path / "store") as opened:
        yield opened


def test_put_get_load_roundtrip(store):
    record, created = store.put(content_sha256("hello"), one_context(), backbone="tiny", metadata={"user": "u1"})
    assert created and is_context_id(record.id)
    assert record.id == context_id(content_sha256("hello"), 4, "backbone-fp", "ckpt-a")
    fetched = store.get(record.id)
    assert fetched == record
    assert (fetched.rate, fetched.n_tokens, fetched.n_soft_tokens, fetched.hidden_size) == (4, 20, 5, 8)
    assert fetched.metadata == {"user": "u1"} and fetched.backbone == "tiny"
    loaded = store.load(record.id)
    assert torch.equal(loaded.soft_tokens[0], soft_tokens(0))
    assert (loaded.checkpoint_id, loaded.backbone_fingerprint, loaded.rates) == ("ckpt-a", "backbone-fp", [4])
    assert store.stats() == {"contexts": 1, "blob_bytes": record.blob_bytes}


def test_same_text_rate_and_model_share_one_id(store):
    sha = content_sha256("same text")
    first, created_first = store.put(sha, one_context(1), metadata={"v": 1})
    again, created_again = store.put(sha, one_context(1), metadata={"v": 2})
    assert created_first and not created_again
    assert again == first and again.metadata == {"v": 1}
    other_rate, _ = store.put(sha, one_context(1, rate=8))
    other_checkpoint, _ = store.put(sha, one_context(1, checkpoint="ckpt-b"))
    other_text, _ = store.put(content_sha256("other text"), one_context(1))
    assert len({first.id, other_rate.id, other_checkpoint.id, other_text.id}) == 4
    assert store.stats()["contexts"] == 4


def test_put_refuses_several_texts(store):
    two = Compressed([soft_tokens(0), soft_tokens(1)], [4, 4], [20, 20], "fp", "ck")
    with pytest.raises(ValueError, match="one compressed text"):
        store.put(content_sha256("x"), two)


def test_delete_removes_row_and_blob(store):
    record, _ = store.put(content_sha256("gone"), one_context())
    blob = store.blob_path(record.id)
    assert blob.is_file()
    assert store.delete(record.id) is True
    assert store.get(record.id) is None and not blob.exists()
    assert store.delete(record.id) is False
    assert store.delete("not-an-id") is False
    with pytest.raises(KeyError):
        store.load(record.id)


def test_restart_reads_back_identical_soft_tokens(tmp_path):
    root = tmp_path / "store"
    with ContextStore(root) as first:
        records = [first.put(content_sha256(f"text {i}"), one_context(i, n=3 + i))[0] for i in range(4)]
    with ContextStore(root) as second:
        assert second.ids() == [r.id for r in records]
        for i, record in enumerate(records):
            assert second.get(record.id) == record
            assert torch.equal(second.load(record.id).soft_tokens[0], soft_tokens(i, n=3 + i))
        assert second.removed_orphans == 0 and second.verify() == []


def test_only_one_process_opens_a_store(tmp_path):
    with ContextStore(tmp_path / "store"):
        with pytest.raises(StoreLockedError, match="in use"):
            ContextStore(tmp_path / "store")
    ContextStore(tmp_path / "store").close()


def test_verify_finds_a_damaged_blob(store):
    record, _ = store.put(content_sha256("damaged"), one_context())
    blob = store.blob_path(record.id)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and record.id in problems[0]
    with pytest.raises(StoreError, match="checksum"):
        store.load(record.id)


def test_failed_commit_leaves_the_old_state(tmp_path, monkeypatch):
    """A crash between writing the blob and committing its row: the entry never appears."""
    root = tmp_path / "store"
    with ContextStore(root) as store:
        kept, _ = store.put(content_sha256("kept"), one_context(0))

        def crash(record):
            raise OSError("simulated crash before commit")

        monkeypatch.setattr(store, "_insert", crash)
        with pytest.raises(OSError, match="simulated"):
            store.put(content_sha256("lost"), one_context(1))
        assert store.ids() == [kept.id]
    with ContextStore(root) as reopened:
        assert reopened.removed_orphans == 1  # the blob that no row names
        assert reopened.ids() == [kept.id] and reopened.verify() == []


def test_interrupted_writes_are_cleaned_up_on_open(tmp_path):
    root = tmp_path / "store"
    with ContextStore(root) as store:
        record, _ = store.put(content_sha256("x"), one_context())
    blobs = root / "blobs"
    (blobs / ".half-written.safetensors.tmp123").write_bytes(b"partial")
    (blobs / f"{'0' * 32}.safetensors").write_bytes(b"orphan")
    with ContextStore(root) as reopened:
        assert reopened.removed_orphans == 2
        assert sorted(p.name for p in blobs.iterdir()) == [f"{record.id}.safetensors"]


def test_newer_schema_is_refused(tmp_path):
    root = tmp_path / "store"
    ContextStore(root).close()
    with sqlite3.connect(root / INDEX_NAME) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer gmsa"):
        ContextStore(root)


WRITER = textwrap.dedent(
    """
    import sys
    import types

    # Import gmsa.serving.store without gmsa/__init__ (which loads transformers): the writer starts faster.
    package = types.ModuleType("gmsa")
    package.__path__ = [sys.argv[2]]
    sys.modules["gmsa"] = package

    import torch
    from gmsa.compressed import Compressed
    from gmsa.serving.store import ContextStore, content_sha256

    def soft_tokens(i, n, hidden=8):
        return torch.arange(n * hidden, dtype=torch.float32).reshape(n, hidden) + 1000.0 * i

    store = ContextStore(sys.argv[1])
    previous = None
    for i in range(100_000):
        n = 200 + i % 50
        record, _ = store.put(content_sha256(f"text {i}"), Compressed([soft_tokens(i, n)], [4], [4 * n], "fp", "ck"))
        if i % 3 == 2:
            store.delete(previous)
        previous = record.id
        print(i, flush=True)
    """
)


def test_kill_9_mid_stream_leaves_a_consistent_store(tmp_path, kill_after=20):
    """``kill -9`` a process writing and deleting contexts; every surviving entry is intact."""
    root = tmp_path / "store"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(REPO / "gmsa")], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        written = -1
        while written < kill_after and time.monotonic() < deadline:
            line = writer.stdout.readline()
            assert line, f"the writer exited early with code {writer.wait()}"
            written = int(line)
        time.sleep(0.003 * kill_after)  # land somewhere inside a later write
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    # The writer kept going while we slept: everything it reported finishing is in the pipe.
    for line in writer.stdout.read().split():
        written = int(line)
    writer.stdout.close()
    assert written >= kill_after
    with ContextStore(root) as store:
        assert store.integrity_check() == "ok"
        assert store.verify() == []
        # written + 1: the write the kill cut short may have landed
        by_id = {context_id(content_sha256(f"text {i}"), 4, "fp", "ck"): i for i in range(written + 2)}
        ids = store.ids()
        assert len(ids) >= written // 3
        for stored_id in ids:
            i = by_id[stored_id]
            assert torch.equal(store.load(stored_id).soft_tokens[0], soft_tokens(i, 200 + i % 50))
        blobs = {p.name.removesuffix(".safetensors") for p in (root / "blobs").iterdir()}
        assert blobs == set(ids)


# the index table as every store on disk has it (schema 1): (column, type, NOT NULL, primary key)
COLUMNS = [("id", "TEXT", 0, 1), ("content_sha256", "TEXT", 1, 0), ("backbone", "TEXT", 1, 0)]
COLUMNS += [(name, "TEXT", 1, 0) for name in ("backbone_fingerprint", "checkpoint_id", "gmsa_version")]
COLUMNS += [(name, "INTEGER", 1, 0) for name in ("rate", "n_tokens", "n_soft_tokens", "hidden_size")]
COLUMNS += [("dtype", "TEXT", 1, 0), ("blob_sha256", "TEXT", 1, 0), ("blob_bytes", "INTEGER", 1, 0)]
COLUMNS += [("created_at", "REAL", 1, 0), ("metadata", "TEXT", 1, 0)]


def test_the_record_fields_make_the_table_stores_on_disk_have(store, tmp_path):
    with sqlite3.connect(tmp_path / "store" / INDEX_NAME) as index:
        rows = index.execute("PRAGMA table_info(contexts)").fetchall()
    assert [(name, kind, not_null, key) for _, name, kind, not_null, _, key in rows] == COLUMNS
    record, _ = store.put("sha", one_context(), metadata={"k": 1})
    assert store.get(record.id) == record


def test_the_api_shows_every_field_of_the_record():
    from gmsa.serving.schemas import ContextInfo
    from gmsa.serving.store import record_types

    assert list(ContextInfo.model_fields) == [*list(record_types())[:9], "compression_ratio", *list(record_types())[9:]]
