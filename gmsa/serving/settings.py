"""Limits and knobs of ``gmsa serve`` (each field is also a command-line option, :mod:`gmsa.cli_options`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..cli_options import option


@dataclass
class WorkerSettings:
    """How the model worker (:class:`gmsa.serving.scheduler.ModelWorker`) queues, batches and runs requests."""

    max_queue: int = option(64, "requests waiting for the model (429 above)")
    max_batch_items: int = option(32, "texts/questions merged into one micro-batch")
    batch_wait_ms: float = option(5.0, "how long the worker waits for more requests to batch")
    model_batch_size: int = option(8, "rows per forward pass inside a micro-batch (bounds memory)")
    max_batch_tokens: int = option(
        65536, "tokens per model micro-batch (texts to compress, or prompts + new tokens); one request over it is 413"
    )
    unit_tokens: int = option(
        2048, "tokens per encoder unit of work (at least one window); the worker switches between units"
    )
    scheduler_aging: float = option(
        0.5, "share of waiting time credited to a run's priority (0: pure least-served-first)"
    )


@dataclass
class RequestLimits:
    """What one request may send and ask for, checked before it is queued."""

    max_body_bytes: int = option(8 * 1024 * 1024, "bytes per request body (413 above)")
    max_text_chars: int = option(100_000, "characters per text or question (413 above)")
    max_batch: int = option(32, "texts or questions per request (413 above)")
    max_metadata_bytes: int = option(4096, "bytes of JSON metadata per request (413 above)")
    max_text_tokens: int = option(8192, "tokens per text (413 above; long texts are compressed window by window)")
    max_question_tokens: int = option(1024, "tokens per question (413 above)")
    max_request_tokens: int = option(65536, "tokens of all texts and questions of one request (413 above)")
    max_sequence_tokens: int = option(8192, "decoder positions per answer: soft tokens + question + max_new_tokens")
    max_new_tokens: int = option(256, "largest max_new_tokens a request may ask for (422 above)")
    max_reconstruct_tokens: int = option(512, "largest context (in tokens) that may be reconstructed (413 above)")
    request_timeout_s: float = option(60.0, "seconds a request may wait for the model (504 after)")


@dataclass
class ServeSettings(WorkerSettings, RequestLimits):
    """Server limits; every violation is answered with a JSON 4xx."""

    api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on every route but /healthz (or set GMSA_API_KEY)"
    )
