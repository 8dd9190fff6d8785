"""The HTTP API (``gmsa serve``) on a tiny random model: every route, every error, restarts, fuzzing."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from gmsa import GMSA
from gmsa.cli import build_parser, main
from gmsa.compressed import Compressed
from gmsa.serving.batcher import CompressTask
from gmsa.serving.server import API_KEY_ENV, settings_from_args
from gmsa.serving.store import ContextStore, content_sha256

FOX = "The quick brown fox jumps over the lazy dog."
PARIS = "Paris is the capital of France and its largest city."
MERGE = "Group merging averages the hidden states of consecutive tokens."


@pytest.fixture
def client(serve) -> TestClient:
    return serve()


def in_threads(calls) -> list:
    """Run the calls concurrently; their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------- happy paths
def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "worker_alive": True}


def test_compress_one_and_many_texts(client, model):
    one = client.post("/v1/contexts", json={"text": FOX, "rate": 2})
    assert one.status_code == 200
    body = one.json()
    n_tokens = len(model.tokenizer(FOX, add_special_tokens=False)["input_ids"])
    context = body["contexts"][0]
    assert context["n_tokens"] == n_tokens == body["n_tokens"]
    assert context["n_soft_tokens"] == -(-n_tokens // 2) and context["created"] is True
    assert body["compression_ratio"] == pytest.approx(n_tokens / context["n_soft_tokens"], abs=1e-3)
    assert body["timings"]["compress_ms"] > 0 and body["timings"]["total_ms"] >= body["timings"]["compress_ms"]

    many = client.post("/v1/contexts", json={"texts": [PARIS, FOX, PARIS], "rate": 2}).json()
    ids = [c["id"] for c in many["contexts"]]
    assert ids[1] == context["id"] and ids[0] == ids[2] != ids[1]
    assert [c["created"] for c in many["contexts"]] == [True, False, False]


def test_texts_longer_than_the_encoder_window_are_accepted(client, model):
    long_text = "The lazy dog. " * 30
    n_tokens = len(model.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert n_tokens > model.config.max_context_tokens
    response = client.post("/v1/contexts", json={"text": long_text, "rate": 4})
    assert response.status_code == 200, response.text
    context = response.json()["contexts"][0]
    assert context["n_tokens"] == n_tokens and context["n_soft_tokens"] >= -(-n_tokens // 4)


def test_same_text_rate_and_model_give_the_same_id(client):
    first = client.post("/v1/contexts", json={"text": FOX, "metadata": {"source": "a"}}).json()["contexts"][0]
    again = client.post("/v1/contexts", json={"text": FOX, "metadata": {"source": "b"}}).json()["contexts"][0]
    other_rate = client.post("/v1/contexts", json={"text": FOX, "rate": 8}).json()["contexts"][0]
    assert again["id"] == first["id"] and not again["created"]
    assert other_rate["id"] != first["id"]
    assert client.get(f"/v1/contexts/{first['id']}").json()["metadata"] == {"source": "a"}


def test_get_and_delete_a_context(client, model):
    created = client.post("/v1/contexts", json={"text": PARIS, "rate": 4, "metadata": {"k": [1, 2]}}).json()
    context_id = created["contexts"][0]["id"]
    info = client.get(f"/v1/contexts/{context_id}").json()
    assert info["id"] == context_id and info["content_sha256"] == content_sha256(PARIS)
    assert info["rate"] == 4 and info["metadata"] == {"k": [1, 2]}
    assert info["checkpoint_id"] == model.checkpoint_id
    assert info["backbone_fingerprint"] == model.config.backbone_fingerprint
    assert info["hidden_size"] == model.compress([PARIS]).soft_tokens[0].shape[-1]
    assert info["n_soft_tokens"] == created["contexts"][0]["n_soft_tokens"] and info["blob_bytes"] > 0
    assert client.delete(f"/v1/contexts/{context_id}").status_code == 204
    assert client.get(f"/v1/contexts/{context_id}").status_code == 404
    assert client.delete(f"/v1/contexts/{context_id}").status_code == 404


def test_answers_from_a_stored_context_match_the_library(client, model):
    context_id = client.post("/v1/contexts", json={"text": FOX, "rate": 2}).json()["contexts"][0]["id"]
    questions = ["What jumps?", "Who is lazy?"]
    response = client.post(
        "/v1/answers",
        json={"context_id": context_id, "questions": questions, "max_new_tokens": 6, "repetition_penalty": 1.1},
    )
    assert response.status_code == 200
    body = response.json()
    expected = model.generate(model.compress([FOX], rate=2), questions, max_new_tokens=6, repetition_penalty=1.1)
    assert body["answers"] == expected
    assert body["context_ids"] == [context_id, context_id]
    assert body["timings"]["generate_ms"] > 0


def test_answer_i_comes_from_context_i(client, model):
    texts, question = [FOX, PARIS, MERGE], "What is it about?"
    ids = [c["id"] for c in client.post("/v1/contexts", json={"texts": texts}).json()["contexts"]]
    options = {"max_new_tokens": 6, "repetition_penalty": 1.1}
    alone = [model.generate(model.compress([text]), [question], **options)[0] for text in texts]
    assert len(set(alone)) == len(texts)  # each context gives its own answer, so a mix-up would show
    for order in ([0, 1, 2], [2, 0, 1]):
        request = {"context_ids": [ids[i] for i in order], "questions": [question] * 3} | options
        body = client.post("/v1/answers", json=request).json()
        assert body["answers"] == [alone[i] for i in order] and body["context_ids"] == request["context_ids"]


def test_answers_from_raw_text_are_not_stored(client, model):
    body = client.post("/v1/answers", json={"text": PARIS, "rate": 2, "question": "What?", "max_new_tokens": 4})
    assert body.status_code == 200
    payload = body.json()
    assert payload["context_ids"] == [None]
    assert payload["answers"] == model.generate(model.compress([PARIS], rate=2), ["What?"], max_new_tokens=4)
    assert payload["timings"]["compress_ms"] > 0 and payload["timings"]["generate_ms"] > 0
    assert client.get("/v1/stats").json()["store"]["contexts"] == 0


def test_reconstruction_matches_the_library(client, model):
    context_id = client.post("/v1/contexts", json={"text": MERGE, "rate": 2}).json()["contexts"][0]["id"]
    body = client.post("/v1/reconstructions", json={"context_id": context_id})
    assert body.status_code == 200
    assert body.json()["text"] == model.reconstruct(model.compress([MERGE], rate=2))[0]
    assert body.json()["context_id"] == context_id


def test_metrics_count_requests_and_store_size(client):
    client.post("/v1/contexts", json={"texts": [FOX, PARIS]})
    client.get("/v1/contexts/" + "0" * 32)
    metrics = client.get("/v1/stats").json()
    routes = metrics["routes"]
    assert routes["POST /v1/contexts"]["by_status"] == {"200": 1}
    assert routes["GET /v1/contexts/{context_id}"]["by_status"] == {"404": 1}
    assert routes["POST /v1/contexts"]["latency_ms"]["p50"] > 0
    assert metrics["store"]["contexts"] == 2 and metrics["store"]["blob_bytes"] > 0
    assert metrics["worker"]["items"] == 2 and metrics["requests"] == 2


def test_openapi_schema_and_docs_are_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/contexts", "/v1/contexts/{context_id}", "/v1/answers", "/v1/reconstructions"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load its code from a CDN


def test_openapi_schema_states_the_servers_limits(serve):
    client = serve(max_text_chars=60, max_batch=2, max_new_tokens=8)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    compress, answer = schemas["CompressRequest"]["properties"], schemas["AnswerRequest"]["properties"]
    assert compress["text"]["anyOf"][0]["maxLength"] == 60
    assert compress["texts"]["anyOf"][0]["maxItems"] == 2 and compress["texts"]["anyOf"][0]["items"]["maxLength"] == 60
    assert answer["max_new_tokens"]["maximum"] == 8 and answer["max_new_tokens"]["default"] == 8
    assert answer["context_ids"]["anyOf"][0]["maxItems"] == 2


# --------------------------------------------------------------------- restarts and batching
def test_restart_keeps_contexts_and_soft_tokens(serve, model, tmp_path):
    first = serve(store=tmp_path / "kept")
    ids = [c["id"] for c in first.post("/v1/contexts", json={"texts": [FOX, PARIS], "rate": 2}).json()["contexts"]]
    before = [first.app.state.service.store.load(i).soft_tokens[0].clone() for i in ids]
    answers = first.post("/v1/answers", json={"context_ids": ids, "questions": ["q?", "r?"], "max_new_tokens": 4})
    first.__exit__(None, None, None)  # lifespan shutdown: worker stopped, store closed

    second = serve(store=tmp_path / "kept")
    again = second.post("/v1/contexts", json={"texts": [FOX, PARIS], "rate": 2}).json()["contexts"]
    assert [c["id"] for c in again] == ids and not any(c["created"] for c in again)
    after = [second.app.state.service.store.load(i).soft_tokens[0] for i in ids]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    repeat = second.post("/v1/answers", json={"context_ids": ids, "questions": ["q?", "r?"], "max_new_tokens": 4})
    assert repeat.json()["answers"] == answers.json()["answers"]


def test_concurrent_requests_are_micro_batched(client, model, busy_worker):
    with busy_worker(client):
        texts = [FOX, PARIS, "The lazy dog.", "Paris is a city."]
        calls = [lambda t=t: client.post("/v1/contexts", json={"text": t, "rate": 2}) for t in texts]
        threads, results = in_threads(calls)
        wait_for(lambda: client.app.state.service.worker.queue_depth == len(texts))
    for thread in threads:
        thread.join(20)
    assert [r.status_code for r in results] == [200] * len(texts)
    assert {r.json()["timings"]["batch_items"] for r in results} == {len(texts)}
    store = client.app.state.service.store
    for text, response in zip(texts, results):
        alone = model.compress([text], rate=2).soft_tokens[0]
        batched = store.load(response.json()["contexts"][0]["id"]).soft_tokens[0]
        assert torch.allclose(alone, batched, atol=1e-5)
    assert client.get("/v1/stats").json()["worker"]["max_batch_items"] == len(texts)


def test_one_bad_request_does_not_fail_its_batch(client, busy_worker):
    worker = client.app.state.service.worker
    with busy_worker(client):
        bad = worker.submit(CompressTask([PARIS + " " + PARIS], 4, 12))  # over its own token limit in the worker
        threads, results = in_threads([lambda: client.post("/v1/contexts", json={"text": FOX})])
        wait_for(lambda: worker.queue_depth == 2)
    for thread in threads:
        thread.join(20)
    assert [r.status_code for r in results] == [200]
    with pytest.raises(ValueError, match="tokens, more than this server accepts \\(12\\)"):
        bad.result(10)


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "exactly one of text, texts"),
        ({"text": FOX, "texts": [FOX]}, "exactly one of text, texts"),
        ({"text": ""}, "at least 1 character"),
        ({"text": "   \n"}, "other than whitespace"),
        ({"texts": []}, "at least 1 item"),
        ({"text": FOX, "rate": 0}, "greater than or equal to 1"),
        ({"text": FOX, "rate": "four"}, "valid integer"),
        ({"text": FOX, "colour": "red"}, "Extra inputs"),
        ({"text": 5}, "valid string"),
    ],
)
def test_compress_rejects_invalid_bodies(client, body, message):
    response = client.post("/v1/contexts", json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_malformed_json_and_lone_surrogates_are_422(client):
    broken = client.post("/v1/contexts", content=b'{"text": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422
    surrogate = client.post(
        "/v1/contexts", content=b'{"text": "a\\ud800b"}', headers={"content-type": "application/json"}
    )
    assert surrogate.status_code == 422 and "valid string" in str(surrogate.json()["detail"])
    for value in (b'"\\ud800"', b"NaN", b"-Infinity"):
        raw = b'{"text": "The dog.", "metadata": {"k": ' + value + b"}}"
        metadata = client.post("/v1/contexts", content=raw, headers={"content-type": "application/json"})
        assert metadata.status_code == 422 and "must be plain JSON" in metadata.text


@pytest.mark.parametrize(
    "body, message",
    [
        ({"question": "q?"}, "exactly one of context_id, context_ids, text"),
        ({"text": FOX}, "exactly one of question, questions"),
        ({"text": FOX, "context_id": "x", "question": "q"}, "exactly one of context_id"),
        ({"context_ids": ["a", "b"], "questions": ["1", "2", "3"]}, "3 questions for 2 contexts"),
        ({"context_id": "a", "rate": 2, "question": "q"}, "rate only applies to text"),
        ({"text": FOX, "question": "q", "max_new_tokens": 0}, "greater than or equal to 1"),
        ({"text": FOX, "question": "q", "max_new_tokens": 10_000}, "over this server's limit of 256"),
        ({"text": FOX, "question": "q", "repetition_penalty": 0}, "greater than 0"),
    ],
)
def test_answers_reject_invalid_bodies(client, body, message):
    response = client.post("/v1/answers", json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_unknown_contexts_are_404(client):
    missing = "f" * 32
    for response in [
        client.get(f"/v1/contexts/{missing}"),
        client.delete(f"/v1/contexts/{missing}"),
        client.post("/v1/answers", json={"context_id": missing, "question": "q"}),
        client.post("/v1/reconstructions", json={"context_id": "not an id"}),
    ]:
        assert response.status_code == 404 and "no context with id" in response.json()["detail"]
    assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json() == {"detail": "Not Found"}
    assert client.put("/v1/contexts/x").status_code == 405


def test_contexts_of_another_checkpoint_are_409(client, model):
    hidden = model.compress([FOX]).soft_tokens[0].shape[-1]
    foreign = Compressed([torch.zeros(3, hidden)], [4], [12], model.config.backbone_fingerprint, "other-checkpoint")
    record, _ = client.app.state.service.store.put(content_sha256(FOX), foreign)
    for response in [
        client.post("/v1/answers", json={"context_id": record.id, "question": "q"}),
        client.post("/v1/reconstructions", json={"context_id": record.id}),
    ]:
        assert response.status_code == 409 and "compress the text again" in response.json()["detail"]


def test_limits_are_413(serve):
    client = serve(max_text_chars=60, max_batch=2, max_metadata_bytes=32, max_text_tokens=12, max_reconstruct_tokens=5)
    cases = [
        (client.post("/v1/contexts", json={"text": "x" * 61}), "61 characters"),
        (client.post("/v1/contexts", json={"texts": [FOX] * 3}), "3 texts, more than this server's limit of 2"),
        (client.post("/v1/contexts", json={"text": FOX, "metadata": {"k": "v" * 40}}), "metadata is"),
        (client.post("/v1/contexts", json={"text": "The dog. " * 5}), "15 tokens, more than this server accepts (12)"),
        (client.post("/v1/answers", json={"text": FOX, "questions": ["a", "b", "c"]}), "3 questions"),
        (client.post("/v1/answers", json={"text": "y" * 61, "question": "q"}), "text[0] has 61 characters"),
    ]
    context_id = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]["id"]
    cases.append((client.post("/v1/reconstructions", json={"context_id": context_id}), "reconstructs at most 5"))
    for response, message in cases:
        assert response.status_code == 413, response.text
        assert message in response.json()["detail"]


def test_oversized_bodies_are_413_with_or_without_content_length(serve):
    client = serve(max_body_bytes=2000)
    declared = client.post("/v1/contexts", json={"text": "word " * 500})
    assert declared.status_code == 413 and "2000 bytes" in declared.json()["detail"]
    chunks = iter([b'{"text": "', b"word " * 500, b'"}'])
    streamed = client.post("/v1/contexts", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "2000 bytes" in streamed.json()["detail"]


def test_full_queue_is_429(serve, busy_worker):
    client = serve(max_queue=1)
    with busy_worker(client):
        queued = client.app.state.service.worker.submit(CompressTask([PARIS], 4, 64))
        response = client.post("/v1/contexts", json={"text": FOX})
    assert response.status_code == 429
    assert "queue is full" in response.json()["detail"] and response.headers["retry-after"] == "1"
    queued.result(10)
    assert client.post("/v1/contexts", json={"text": FOX}).status_code == 200


def test_request_timeout_is_504(serve, busy_worker):
    client = serve(request_timeout_s=0.2)
    with busy_worker(client):
        response = client.post("/v1/contexts", json={"text": FOX})
    assert response.status_code == 504 and "timed out after 0.2 s" in response.json()["detail"]
    assert client.post("/v1/contexts", json={"text": FOX}).status_code == 200


def test_a_context_deleted_while_it_is_read_is_404_and_a_damaged_one_a_clear_500(client, monkeypatch):
    context_id = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]["id"]
    store = client.app.state.service.store
    blob = store.blob_path(context_id)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    damaged = client.post("/v1/answers", json={"context_id": context_id, "question": "q"})
    assert damaged.status_code == 500 and "is damaged" in damaged.json()["detail"]

    def deleted_meanwhile(context_id_, verify=True):  # the row went just after it was read
        raise KeyError(context_id_)

    monkeypatch.setattr(store, "load", deleted_meanwhile)
    gone = client.post("/v1/reconstructions", json={"context_id": context_id})
    assert gone.status_code == 404


def test_unexpected_errors_are_json_500_without_traceback(serve, monkeypatch):
    client = serve(raise_server_exceptions=False)

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client.app.state.service.store, "get", broken)
    response = client.get("/v1/contexts/" + "a" * 32)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error (RuntimeError); see the server log"}


# --------------------------------------------------------------------- auth
PROTECTED = [
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/v1/stats", None),
    ("POST", "/v1/contexts", {"text": FOX}),
    ("GET", "/v1/contexts/" + "0" * 32, None),
    ("DELETE", "/v1/contexts/" + "0" * 32, None),
    ("POST", "/v1/answers", {"text": FOX, "question": "q"}),
    ("POST", "/v1/reconstructions", {"context_id": "0" * 32}),
]


def test_api_key_guards_every_route_but_healthz(serve):
    client = serve(api_key="s3cret")
    assert client.get("/healthz").status_code == 200
    for method, path, body in PROTECTED:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}]:
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert "API key" in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"
        allowed = client.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code in (200, 204, 404), (method, path, allowed.text)


def test_cli_settings_take_the_api_key_from_the_environment(monkeypatch):
    parser = build_parser()
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = parser.parse_args(["serve", "--max-batch", "3", "--request-timeout-s", "1.5"])
    settings = settings_from_args(args)
    assert (settings.api_key, settings.max_batch, settings.request_timeout_s) == ("from-env", 3, 1.5)
    assert (args.host, args.port, args.store) == ("127.0.0.1", 8000, "./gmsa-store")
    explicit = settings_from_args(parser.parse_args(["serve", "--api-key", "flag"]))
    assert explicit.api_key == "flag"


def test_gmsa_serve_loads_the_model_once_and_runs_uvicorn(monkeypatch, model, tmp_path):
    calls = {}

    def fake_from_pretrained(path=None, backbone=None, **kwargs):
        calls["model"] = (path, backbone)
        return model

    monkeypatch.setattr(GMSA, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: calls.update(app=app, address=(host, port)))
    argv = ["serve", "--store", str(tmp_path / "s"), "--port", "8123", "--model", "ckpt", "--max-batch", "2"]
    assert main(argv) == 0
    assert calls["model"] == ("ckpt", None) and calls["address"] == ("127.0.0.1", 8123)
    app = calls["app"]
    assert app.state.settings.max_batch == 2 and app.state.service.gmsa is model
    with pytest.raises(sqlite3.ProgrammingError):  # the command closed its store when uvicorn returned
        app.state.service.store.stats()


def test_gmsa_serve_refuses_a_store_in_use(tmp_path, capsys):
    with ContextStore(tmp_path / "busy"):
        assert main(["serve", "--store", str(tmp_path / "busy")]) == 2
    assert "in use by another process" in capsys.readouterr().err
