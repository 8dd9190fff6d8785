"""Repair and consistency: a damaged context is rewritten by POSTing its text again; DELETE is one operation."""

from __future__ import annotations

import torch

from gmsa.serving.store import ContextStore, content_sha256

FOX = "The quick brown fox jumps over the lazy dog."


def test_reposting_the_text_of_a_damaged_context_rewrites_it(serve, model):
    client = serve()
    first = client.post("/v1/contexts", json={"text": FOX, "metadata": {"k": 1}}).json()["contexts"][0]
    store = client.app.state.service.store
    blob = store.blob_path(first["id"])
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    question = {"context_id": first["id"], "question": "q", "max_new_tokens": 3}
    assert client.post("/v1/answers", json=question).status_code == 500
    again = client.post("/v1/contexts", json={"texts": [FOX, FOX]}).json()["contexts"]
    assert [(c["id"], c["created"], c["repaired"]) for c in again] == [
        (first["id"], False, True),
        (first["id"], False, False),
    ]
    assert store.verify() == [] and store.get(first["id"]).metadata == {"k": 1}
    assert torch.allclose(store.load(first["id"]).soft_tokens[0], model.compress([FOX]).soft_tokens[0], atol=1e-5)
    assert client.post("/v1/answers", json=question).status_code == 200
    intact = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]
    assert (intact["created"], intact["repaired"]) == (False, False)


def test_a_missing_blob_is_repaired_too(tmp_path, model):
    with ContextStore(tmp_path / "store") as store:
        compressed = model.compress([FOX])
        record, _ = store.put(content_sha256(FOX), compressed)
        store.blob_path(record.id).unlink()
        assert not store.is_intact(record.id)
        repaired = store.repair(content_sha256(FOX), compressed)
        assert repaired.id == record.id and repaired.created_at == record.created_at
        assert store.is_intact(record.id) and store.verify() == []


def test_delete_is_204_once_the_row_is_gone_even_if_the_file_cannot_be_removed(serve, monkeypatch, tmp_path):
    client = serve()
    context_id = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]["id"]
    store = client.app.state.service.store
    blob = store.blob_path(context_id)
    original_unlink = type(blob).unlink

    def failing_unlink(path, missing_ok=False):
        if path == blob:
            raise PermissionError("read-only file system")
        return original_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(type(blob), "unlink", failing_unlink)
    assert client.delete(f"/v1/contexts/{context_id}").status_code == 204
    assert client.get(f"/v1/contexts/{context_id}").status_code == 404
    assert client.post("/v1/answers", json={"context_id": context_id, "question": "q"}).status_code == 404
    monkeypatch.undo()
    assert blob.exists()  # an orphan until the store is opened again
    store.close()
    with ContextStore(store.root) as reopened:
        assert reopened.removed_orphans == 1 and not blob.exists()
