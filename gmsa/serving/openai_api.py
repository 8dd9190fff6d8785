"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The body is OpenAI's chat-completion request plus ``context_ids`` (stored contexts) and
``context_texts`` (texts compressed on the fly at ``rate``): their soft tokens go before the
messages, and the decoder answers greedily. With ``stream: true`` the answer comes as
server-sent events (``chat.completion.chunk`` objects, then ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .batcher import AnswerTask
from .errors import InvalidRequestError, NotFoundError, ServiceError, TooLargeError
from .guards import http_status
from .scheduler import JobFuture
from .schemas import CONFLICT, ERROR_RESPONSES, MAX_RATE, NOT_FOUND, ContextId, Text
from .service import Deadline, GMSAService

DEFAULT_MAX_TOKENS = 64
MODEL_ALIAS = "gmsa"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completion body (other OpenAI fields are accepted and ignored: decoding is greedy)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="ignored: decoding is greedy")
    stream: bool = False
    stream_options: StreamOptions | None = None
    context_ids: list[ContextId] | None = Field(None, min_length=1, description="stored contexts, in order")
    context_texts: list[Text] | None = Field(None, min_length=1, description="texts compressed on the fly")
    rate: int | None = Field(None, ge=1, le=MAX_RATE, description="rate for context_texts")
    repetition_penalty: float = Field(1.3, gt=0.0, le=10.0, allow_inf_nan=False)


def render_prompt(messages: list[ChatMessage]) -> str:
    """The decoder prompt: one user message verbatim (as ``/v1/answers``), else ``role: text`` lines."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].text()
    lines = [f"{message.role}: {message.text()}" for message in messages]
    return "\n".join(lines + ["assistant:"])


class ChatCompletions:
    """What the OpenAI routes do, on top of :class:`GMSAService`."""

    def __init__(self, service: GMSAService):
        self.service = service
        self.created = int(time.time())

    @property
    def model_id(self) -> str:
        return self.service.gmsa.checkpoint_id

    def models(self) -> dict:
        card = {"object": "model", "created": self.created, "owned_by": "gmsa"}
        return {"object": "list", "data": [card | {"id": self.model_id}, card | {"id": MODEL_ALIAS}]}

    def _max_tokens(self, body: ChatCompletionRequest) -> int:
        limit = self.service.settings.max_new_tokens
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limit:
            raise InvalidRequestError(f"max_tokens {asked} is over this server's limit of {limit}")
        return asked or min(DEFAULT_MAX_TOKENS, limit)

    async def prepare(self, body: ChatCompletionRequest) -> tuple[AnswerTask, int, int, Deadline]:
        """Check the request and build its soft-token prompt; (task, cost, prompt tokens, deadline)."""
        service = self.service
        if body.model not in (self.model_id, MODEL_ALIAS):
            raise NotFoundError(f"no model {body.model[:40]!r}: GET /v1/models lists this server's")
        if not (body.context_ids or body.context_texts):
            raise InvalidRequestError("give context_ids or context_texts: the soft tokens the messages are about")
        deadline = Deadline(service.settings.request_timeout_s)
        prompt = render_prompt(body.messages)
        service.limits.check_texts([prompt], "messages")
        max_new = self._max_tokens(body)
        (n_prompt,) = await run_in_threadpool(service.limits.count, [prompt])
        service.limits.check_tokens([n_prompt], "messages", service.settings.max_question_tokens)
        if body.context_ids and len(body.context_ids) > service.settings.max_batch:
            raise TooLargeError(f"{len(body.context_ids)} context_ids, more than {service.settings.max_batch}")
        context, _ = await service.prompt_context(body.context_ids or [], body.context_texts or [], body.rate, deadline)
        cost = await run_in_threadpool(service.limits.questions, [prompt], context.n_soft_tokens, max_new)
        task = AnswerTask(context, [prompt], max_new, body.repetition_penalty)
        return task, cost, context.n_soft_tokens[0] + n_prompt, deadline

    async def complete(self, body: ChatCompletionRequest):
        task, cost, n_prompt, deadline = await self.prepare(body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            loop = asyncio.get_running_loop()
            updates: asyncio.Queue[list[int]] = asyncio.Queue()
            task.on_tokens = lambda rows: loop.call_soon_threadsafe(updates.put_nowait, rows[0])
            future = self.service.submit(task, deadline, cost)  # 429 before the answer begins
            events = self._events(task, future, updates, n_prompt, deadline, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await self.service.run(task, deadline, cost)
        answer = result.value[0]
        n_answer, finish = await self._finish(answer, task.max_new_tokens)
        return {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": _usage(n_prompt, n_answer),
        }

    async def _finish(self, answer: str, max_new_tokens: int) -> tuple[int, str]:
        (n_answer,) = await run_in_threadpool(self.service.limits.count, [answer])
        return n_answer, "length" if n_answer >= max_new_tokens else "stop"

    async def _events(
        self,
        task: AnswerTask,
        future: JobFuture,
        updates: asyncio.Queue,
        n_prompt: int,
        deadline: Deadline,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The answer as server-sent events, its text sent as the model decodes it."""
        chunk = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time())}
        chunk["model"] = self.model_id

        def event(delta: dict, finish: str | None = None) -> str:
            return (
                f"data: {json.dumps(chunk | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"
            )

        waiter = asyncio.wrap_future(future)
        sent = ""
        try:
            yield event({"role": "assistant", "content": ""})
            while not waiter.done():
                update = asyncio.ensure_future(updates.get())
                await asyncio.wait([update, waiter], timeout=deadline.left(), return_when="FIRST_COMPLETED")
                if not update.done():
                    update.cancel()
                    if not waiter.done():  # the deadline passed
                        future.abandon("deadline")
                        yield _error_event(504, f"timed out after {deadline.seconds:g} s waiting for the model")
                        return
                    continue
                text = self._partial_text(update.result(), task.max_new_tokens)
                if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield event({"content": text[len(sent) :]})
                    sent = text
            try:
                answer = self.service.result(waiter, deadline).value[0]
            except ServiceError as err:  # the answer has begun: report the error as an event
                yield _error_event(http_status(err), str(err))
                return
            if answer.startswith(sent) and len(answer) > len(sent):
                yield event({"content": answer[len(sent) :]})
            n_answer, finish = await self._finish(answer, task.max_new_tokens)
            yield event({}, finish)
            if include_usage:
                yield f"data: {json.dumps(chunk | {'choices': [], 'usage': _usage(n_prompt, n_answer)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():  # the client went away (the stream was cancelled): stop the work
                future.abandon("client gone")

    def _partial_text(self, ids: list[int], max_new_tokens: int) -> str:
        tokenizer = self.service.limits.tokenizer
        ids = ids[:max_new_tokens]
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        return tokenizer.decode(ids, skip_special_tokens=True).lstrip()


def _error_event(status: int, message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _usage(n_prompt: int, n_answer: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_answer, "total_tokens": n_prompt + n_answer}


def add_openai_routes(app: FastAPI, service: GMSAService, auth: list[Depends]) -> None:
    chat = ChatCompletions(service)
    errors = ERROR_RESPONSES | NOT_FOUND | CONFLICT

    @app.get("/v1/models", tags=["openai"], dependencies=auth, responses=ERROR_RESPONSES)
    def models() -> dict:
        """The served model (its checkpoint id, and the alias ``gmsa``), as OpenAI lists models."""
        return chat.models()

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        dependencies=auth,
        responses=errors | {200: {"content": {"application/json": {}, "text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest):
        """OpenAI chat completion over stored (``context_ids``) or on-the-fly (``context_texts``) soft tokens."""
        return await chat.complete(body)
