"""What goes wrong with a request, in the service's terms: each error names a reason, not an HTTP status.

The service and the routes raise these; :func:`gmsa.serving.guards.install_error_handlers` is the one
place that turns them into HTTP responses (``HTTP_STATUS`` there). Their messages go to the client and
quote at most ``MAX_ECHO_CHARS`` characters of its input (:func:`shorten`).
"""

from __future__ import annotations

MAX_ECHO_CHARS = 40


def shorten(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` cut to ``limit`` characters (with an ellipsis): client input echoed in errors stays small."""
    return value if len(value) <= limit else value[:limit] + "..."


class ServiceError(Exception):
    """A request the service refuses or cannot finish; ``str(err)`` is the message for the client."""


class InvalidRequestError(ServiceError):
    """The request asks for what this server does not do (a value over its settings, a bad combination)."""


class NotFoundError(ServiceError):
    """No such context (or model)."""


class ConflictError(ServiceError):
    """A stored context that another checkpoint or backbone made."""


class TooLargeError(ServiceError):
    """Text, batch, tokens or metadata beyond the server's limits."""


class BusyError(ServiceError):
    """The model's queue is full: try again after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TimedOutError(ServiceError):
    """The request's time budget ran out while it waited for the model."""


class ClientGoneError(ServiceError):
    """The client closed the connection before its answer was ready."""


class DamagedContextError(ServiceError):
    """A stored context whose file does not match what was written (compressing its text again repairs it)."""
