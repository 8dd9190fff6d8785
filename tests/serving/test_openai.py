"""The OpenAI-compatible routes, called by the real ``openai`` client against a running server."""

from __future__ import annotations

import openai
import pytest

from gmsa.serving.store import content_sha256

FOX = "The quick brown fox jumps over the lazy dog."
PARIS = "Paris is the capital of France and its largest city."
KEY = "s3cret"


@pytest.fixture
def server(live_server):
    url, app = live_server(api_key=KEY, max_new_tokens=16)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    return client, app


def stored_id(app, model, text: str, rate: int = 2) -> str:
    record, _ = app.state.service.store.put(content_sha256(text), model.compress([text], rate=rate))
    return record.id


def test_models_lists_the_checkpoint(server, model):
    client, _ = server
    assert {m.id for m in client.models.list().data} == {model.checkpoint_id, "gmsa"}


def test_chat_completion_over_a_stored_context_matches_the_library(server, model):
    client, app = server
    context_id = stored_id(app, model, FOX)
    completion = client.chat.completions.create(
        model="gmsa",
        messages=[{"role": "user", "content": "What jumps?"}],
        max_tokens=6,
        extra_body={"context_ids": [context_id], "repetition_penalty": 1.1},
    )
    expected = model.generate(model.compress([FOX], rate=2), ["What jumps?"], max_new_tokens=6, repetition_penalty=1.1)
    assert completion.choices[0].message.content == expected[0]
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    n_soft = model.compress([FOX], rate=2).n_soft_tokens[0]
    n_question = len(model.tokenizer("What jumps?", add_special_tokens=False)["input_ids"])
    assert completion.usage.prompt_tokens == n_soft + n_question


def test_streaming_yields_chunks_that_add_up_to_the_answer(server, model):
    client, app = server
    context_id = stored_id(app, model, PARIS)
    kwargs = {
        "model": model.checkpoint_id,
        "messages": [{"role": "user", "content": "Where?"}],
        "max_tokens": 8,
        "extra_body": {"context_ids": [context_id]},
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len(chunks) >= 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole
    n_answer_tokens = len(model.tokenizer(whole, add_special_tokens=False)["input_ids"])
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert n_answer_tokens > 2 and len(content_chunks) >= 2  # sent as it was decoded, not in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens > 0


def test_context_texts_are_compressed_on_the_fly(server, model):
    client, app = server
    completion = client.chat.completions.create(
        model="gmsa",
        messages=[{"role": "user", "content": "What jumps?"}],
        max_tokens=5,
        extra_body={"context_texts": [FOX], "rate": 2, "repetition_penalty": 1.0},
    )
    expected = model.generate(model.compress([FOX], rate=2), ["What jumps?"], max_new_tokens=5, repetition_penalty=1.0)
    assert completion.choices[0].message.content == expected[0]
    assert app.state.service.store.stats()["contexts"] == 0


def test_errors_reach_the_client_as_openai_exceptions(server, model):
    client, app = server
    message = [{"role": "user", "content": "q?"}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=message, extra_body={"context_texts": [FOX]})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gmsa", messages=message, extra_body={"context_ids": ["0" * 32]})
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="gmsa", messages=message)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model="gmsa", messages=message, max_tokens=17, extra_body={"context_texts": [FOX]}
        )
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
