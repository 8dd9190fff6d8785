"""Auth before the body, content types, strict types, bounded errors, a connection that outlives an error."""

from __future__ import annotations

import asyncio
import http.client
from urllib.parse import urlparse

import pytest
from prometheus_client.parser import text_string_to_metric_families

FOX = "The quick brown fox jumps over the lazy dog."
KEY = "s3cret"


def call_asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """Send one request straight to the ASGI app; (status, whether the app read the body)."""
    read = False
    status = 0

    async def receive():
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return status, read


def test_unauthenticated_8mb_body_is_401_without_being_read(serve):
    client = serve(api_key=KEY)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(8 * 2**20).encode())]
    for extra in ([], [(b"authorization", b"Bearer wrong")]):
        assert call_asgi(client.app, "POST", "/v1/contexts", headers + extra) == (401, False)
    response = client.post("/v1/contexts", content=b"{" * 1000, headers={"content-type": "application/json"})
    assert response.status_code == 401 and response.headers["connection"] == "close"
    assert response.headers["www-authenticate"] == "Bearer" and "missing API key" in response.json()["detail"]


def test_non_json_content_type_is_415(client_with_key):
    client, auth = client_with_key
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = client.post("/v1/contexts", content=b'{"text": "a"}', headers=auth | {"content-type": content_type})
        assert response.status_code == 415 and "application/json" in response.json()["detail"]
    ok = client.post(
        "/v1/contexts", json={"text": FOX}, headers=auth | {"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


@pytest.fixture
def client_with_key(serve):
    return serve(api_key=KEY), {"Authorization": f"Bearer {KEY}"}


def test_head_healthz_needs_no_key(client_with_key):
    client, _ = client_with_key
    response = client.head("/healthz")
    assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize("field, value", [("rate", True), ("rate", "4"), ("rate", 4.0)])
def test_types_are_strict(serve, field, value):
    response = serve().post("/v1/contexts", json={"text": FOX, field: value})
    assert response.status_code == 422 and "valid integer" in response.text


def test_answers_are_strict_too(serve):
    client = serve()
    body = {"text": FOX, "question": "q", "max_new_tokens": True}
    assert client.post("/v1/answers", json=body).status_code == 422


def test_errors_echo_no_paths_and_no_long_input(serve, tmp_path):
    client = serve()
    long_id = "x" * 5000
    response = client.get(f"/v1/contexts/{long_id}")
    assert response.status_code == 404 and len(response.json()["detail"]) < 100
    context_id = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]["id"]
    blob = client.app.state.service.store.blob_path(context_id)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    damaged = client.post("/v1/answers", json={"context_id": context_id, "question": "q"})
    assert damaged.status_code == 500 and "is damaged" in damaged.json()["detail"]
    assert str(tmp_path) not in damaged.text and "safetensors" not in damaged.text


def test_the_connection_survives_an_unexpected_500(live_server, monkeypatch):
    url, app = live_server()
    calls = {"n": 0}
    get = app.state.service.store.get

    def broken_once(context_id):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        return get(context_id)

    monkeypatch.setattr(app.state.service.store, "get", broken_once)
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    statuses = []
    for _ in range(2):
        connection.request("GET", "/v1/contexts/" + "a" * 32)
        response = connection.getresponse()
        statuses.append((response.status, response.read()))
    connection.close()
    assert statuses[0] == (500, b'{"detail":"internal server error (RuntimeError); see the server log"}')
    assert statuses[1][0] == 404  # the same keep-alive connection answered again


def test_metrics_are_prometheus_text(serve):
    client = serve(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    client.post("/v1/contexts", json={"texts": [FOX, "Paris is a city."]}, headers=auth)
    client.get("/v1/contexts/" + "0" * 32, headers=auth)
    client.get("/v1/contexts/" + "0" * 32)  # 401, still counted under its route
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("gmsa_http_requests_total", method="POST", route="/v1/contexts", status="200") == 1
    route = "/v1/contexts/{context_id}"
    assert value("gmsa_http_requests_total", method="GET", route=route, status="404") == 1
    assert value("gmsa_http_requests_total", method="GET", route=route, status="401") == 1
    assert value("gmsa_http_request_duration_seconds_count", method="POST", route="/v1/contexts", status="200") == 1
    assert value("gmsa_batch_items_sum", kind="compress") == 2
    assert value("gmsa_queue_depth") == 0
    assert value("gmsa_store_contexts") == 2 and value("gmsa_store_blob_bytes") > 0
