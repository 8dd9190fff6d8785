"""The service's errors: each kind has one HTTP status, given in one place, and they reach clients as JSON."""

from __future__ import annotations

import pytest

from gmsa.serving import errors
from gmsa.serving.guards import HTTP_STATUS, http_status

KINDS = errors.ServiceError.__subclasses__()


def test_every_kind_of_service_error_has_a_status():
    assert set(KINDS) == set(HTTP_STATUS)
    assert http_status(errors.NotFoundError("x")) == 404 and http_status(errors.BusyError("x")) == 429


@pytest.mark.parametrize("kind", KINDS)
def test_a_service_error_is_answered_with_its_status_and_message(serve, monkeypatch, kind):
    client = serve()

    async def refuse(context_id_):
        raise kind("refused: " + errors.shorten(context_id_, 8))

    monkeypatch.setattr(client.app.state.service, "record", refuse)
    response = client.get("/v1/contexts/" + "a" * 32)
    assert response.status_code == HTTP_STATUS[kind]
    assert response.json() == {"detail": "refused: aaaaaaaa..."}
    assert (response.headers.get("retry-after") == "1") == (kind is errors.BusyError)
