"""Request and response bodies of the HTTP API (pydantic models; they make the OpenAPI schema)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from .store import record_types

MAX_RATE = 1024


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain something other than whitespace")
    return value


def _plain_json(value: dict | None) -> dict | None:
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"must be plain JSON: finite numbers and valid Unicode text ({err})") from err
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
ContextId = Annotated[
    str,
    Field(min_length=1, max_length=128, description="an id returned by POST /v1/contexts"),
    AfterValidator(_not_blank),
]


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(names)} (got {', '.join(given) or 'none'})")


def _one_given(names: tuple[str, ...], absent_with: dict[str, tuple[str, ...]] | None = None) -> dict:
    """JSON schema: exactly one of ``names`` is present and not null (what ``_exactly_one`` checks).

    ``absent_with[name]`` lists fields that must then be absent or null.
    """
    branches = []
    for name in names:
        properties = {name: {"not": {"type": "null"}}}
        properties |= {other: {"type": "null"} for other in (absent_with or {}).get(name, ())}
        branches.append({"required": [name], "properties": properties})
    return {"oneOf": branches}


class Strict(BaseModel):
    """No unknown fields and no coercion (``rate: true`` or ``"4"`` is not an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Timings(BaseModel):
    """Where the time of a request went, in milliseconds."""

    queue_ms: float = Field(description="waiting for the model worker")
    compress_ms: float = Field(0.0, description="running the encoder (its share of a micro-batch)")
    generate_ms: float = Field(0.0, description="running the decoder (its share of a micro-batch)")
    total_ms: float = Field(description="the whole request, as seen by the server")
    batch_items: int = Field(1, description="texts or questions in the largest micro-batch this request ran in")


class CompressRequest(Strict):
    """Compress one text (``text``) or several (``texts``) and store the soft tokens."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_given(("text", "texts")))

    text: Text | None = None
    texts: list[Text] | None = Field(None, min_length=1)
    rate: int | None = Field(None, ge=1, le=MAX_RATE, description="tokens per soft token (default: the model's)")
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_plain_json)] = Field(
        None, description="free JSON kept with each new context"
    )

    @model_validator(mode="after")
    def _one_source(self) -> CompressRequest:
        _exactly_one(self, ("text", "texts"))
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts)


class ContextSummary(BaseModel):
    id: str
    rate: int
    n_tokens: int
    n_soft_tokens: int
    compression_ratio: float
    created: bool = Field(description="false when the same text, rate and model were already stored")
    repaired: bool = Field(False, description="true when the stored file was damaged and has been rewritten")


class CompressResponse(BaseModel):
    contexts: list[ContextSummary]
    n_tokens: int
    n_soft_tokens: int
    compression_ratio: float
    timings: Timings


def _context_info() -> type[BaseModel]:
    """``ContextInfo``: the fields of the store's ``ContextRecord``, with ``compression_ratio`` after the counts."""
    fields: dict[str, Any] = {}
    for name, kind in record_types().items():
        fields[name] = (kind, ...)
        if name == "n_soft_tokens":
            fields["compression_ratio"] = (float, ...)
    return create_model("ContextInfo", __doc__="Metadata of a stored context.", **fields)


ContextInfo = _context_info()


class AnswerRequest(Strict):
    """Answer questions from stored contexts (``context_id``/``context_ids``) or a raw ``text``.

    One context is shared by every question; otherwise ``context_ids[i]`` answers ``questions[i]``.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "allOf": [
                _one_given(("context_id", "context_ids", "text"), {"context_id": ("rate",), "context_ids": ("rate",)}),
                _one_given(("question", "questions")),
            ]
        },
    )

    context_id: ContextId | None = None
    context_ids: list[ContextId] | None = Field(None, min_length=1)
    text: Text | None = Field(None, description="compressed on the fly, not stored")
    rate: int | None = Field(None, ge=1, le=MAX_RATE, description="only with text")
    question: Text | None = None
    questions: list[Text] | None = Field(None, min_length=1)
    max_new_tokens: int = Field(64, ge=1, description="at most the server's --max-new-tokens (the default if lower)")
    repetition_penalty: float = Field(1.3, gt=0.0, le=10.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_of_each(self) -> AnswerRequest:
        _exactly_one(self, ("context_id", "context_ids", "text"))
        _exactly_one(self, ("question", "questions"))
        if self.rate is not None and self.text is None:
            raise ValueError("rate only applies to text (stored contexts keep the rate they were compressed at)")
        n_contexts, n_questions = len(self.context_ids or [None]), len(self.question_list())
        if n_contexts not in (1, n_questions):
            raise ValueError(f"{n_questions} questions for {n_contexts} contexts: give one context or one per question")
        return self

    def question_list(self) -> list[str]:
        return [self.question] if self.question is not None else list(self.questions)


class AnswerResponse(BaseModel):
    answers: list[str]
    context_ids: list[str | None] = Field(description="the context each answer came from (null for raw text)")
    timings: Timings


class ReconstructRequest(Strict):
    """Ask the decoder to restate a stored context from its soft tokens."""

    context_id: ContextId


class ReconstructResponse(BaseModel):
    context_id: str
    text: str
    timings: Timings


class Health(BaseModel):
    status: str
    worker_alive: bool


class ErrorResponse(BaseModel):
    """Every error: ``detail`` is a message (or, for 422, pydantic's list of what is wrong)."""

    detail: str | list[Any]


ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "the body is not UTF-8 JSON",
        401: "missing or wrong API key",
        413: "text, batch, tokens, metadata or body larger than the server's limits",
        415: "the body is not sent as application/json",
        422: "invalid request",
        429: "the model queue is full: retry later",
        504: "the request timed out waiting for the model",
    }.items()
}
PROMETHEUS_TEXT: dict[int | str, dict] = {
    200: {"description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such context"}}
CONFLICT = {409: {"model": ErrorResponse, "description": "context made by another model checkpoint"}}


def _constrain(prop: dict, **constraints) -> None:
    """Add constraints to the non-null branch of a property's schema."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)


def state_limits(openapi: dict, settings) -> dict:
    """Write the server's configured limits into the OpenAPI schema (maxLength, maxItems, maximum)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    chars, batch = {"maxLength": settings.max_text_chars}, {"maxItems": settings.max_batch}
    for model, single, many in [("CompressRequest", "text", "texts"), ("AnswerRequest", "question", "questions")]:
        properties = schemas.get(model, {}).get("properties", {})
        if single in properties:
            _constrain(properties[single], **chars)
            _constrain(properties[many], **batch)
            for branch in properties[many].get("anyOf", []):
                branch.get("items", {}).update(chars)
    answer = schemas.get("AnswerRequest", {}).get("properties", {})
    if answer:
        _constrain(answer["text"], **chars)
        _constrain(answer["context_ids"], **batch)
        limit = settings.max_new_tokens
        _constrain(answer["max_new_tokens"], maximum=limit, default=min(answer["max_new_tokens"]["default"], limit))
    return openapi
