"""Token limits are checked before a request is queued: a busy model worker does not delay a 413."""

from __future__ import annotations

import pytest

from gmsa.serving.batcher import CompressTask

FOX = "The quick brown fox jumps over the lazy dog."


def n_tokens(model, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_long_question_is_413_while_the_worker_is_busy(serve, model, busy_worker):
    client = serve()
    question = "Which of the many words in this question matters? " * 800  # ~8k tokens of the real tokenizer
    text_id = client.post("/v1/contexts", json={"text": FOX}).json()["contexts"][0]["id"]
    with busy_worker(client):
        response = client.post("/v1/answers", json={"context_id": text_id, "question": question})
        assert client.app.state.service.worker.queue_depth == 0  # refused before queueing
    assert response.status_code == 413
    assert f"questions[0] has {n_tokens(model, question)} tokens, more than this server accepts (1024)" in response.text


@pytest.mark.parametrize(
    "settings, path, body, message",
    [
        ({"max_text_tokens": 12}, "/v1/contexts", {"text": "The dog. " * 5}, "texts[0] has 15 tokens"),
        ({"max_text_tokens": 12}, "/v1/answers", {"text": "The dog. " * 5, "question": "q"}, "text[0] has 15 tokens"),
        (
            {"max_request_tokens": 20},
            "/v1/contexts",
            {"texts": [f"The dog {i}. " * 2 for i in range(4)]},
            "the request has",
        ),
        ({"max_batch_tokens": 20}, "/v1/contexts", {"texts": [f"The dog {i}. " * 2 for i in range(4)]}, "in one batch"),
        (
            {"max_sequence_tokens": 40},
            "/v1/answers",
            {"text": "The dog. " * 5, "rate": 1, "question": "Why?", "max_new_tokens": 30},
            "answer 0 needs",
        ),
    ],
)
def test_token_limits_are_413_before_queueing(serve, model, busy_worker, settings, path, body, message):
    client = serve(**settings)
    with busy_worker(client):
        response = client.post(path, json=body)
        assert client.app.state.service.worker.queue_depth == 0
    assert response.status_code == 413 and message in response.json()["detail"], response.text


def test_micro_batches_stay_under_the_token_budget(serve, model, busy_worker):
    client = serve(max_batch_tokens=100)
    worker = client.app.state.service.worker
    with busy_worker(client):
        futures = [worker.submit(CompressTask([text], 4, 64), cost) for text, cost in [(FOX, 60), (FOX + "!", 60)]]
        small = [worker.submit(CompressTask([FOX + "?"], 4, 64), 30)]
    results = [future.result(10) for future in futures + small]
    assert [r.batch_items for r in results] == [1, 2, 2]  # 60 | 60 + 30
