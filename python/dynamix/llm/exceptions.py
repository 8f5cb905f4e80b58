"""Dynamo's exception vocabulary (``dynamo.llm.exceptions``). A handler raises these to choose the
error its caller sees (python-sdk spec §4.4); the SDK client raises :class:`DynamoException`
subclasses of ``ValueError`` for failed calls (spec §5.4)."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "Cancelled",
    "CannotConnect",
    "Disconnected",
    "DynamoException",
    "EngineShutdown",
    "HttpError",
    "Internal",
    "InvalidArgument",
    "InvalidRequest",
    "NotFound",
    "StreamIncomplete",
    "Unavailable",
    "Unknown",
]


class DynamoException(Exception):
    """Base of Dynamo's errors. ``error_class`` is the class on the wire."""

    error_class = "Internal"


class Unknown(DynamoException):
    error_class = "Internal"


class InvalidArgument(DynamoException):
    error_class = "InvalidRequest"


class CannotConnect(DynamoException):
    error_class = "Unavailable"


class Disconnected(DynamoException):
    error_class = "Unavailable"


class StreamIncomplete(DynamoException):
    error_class = "Unavailable"


class Cancelled(DynamoException):
    error_class = "Cancelled"


class EngineShutdown(DynamoException):
    error_class = "Unavailable"


class HttpError(DynamoException):
    """Answer with HTTP status ``code`` and ``message`` (4xx keep the message)."""

    def __init__(self, code: int, message: str) -> None:
        if not isinstance(code, int) or not 100 <= code <= 599:
            raise ValueError(f"HttpError code {code!r} must be an HTTP status (100-599)")
        super().__init__(message)
        self.code = code
        self.message = message


class CallError(ValueError, DynamoException):
    """A failed call, as the SDK client raises it: ``str(e)`` is ``<Class>: <message>``."""

    def __init__(self, error_class: str, message: str, error_type: Optional[str] = None) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.error_type = error_type
        self.message = message


class InvalidRequest(CallError):
    pass


class Internal(CallError):
    pass


class Unavailable(CallError):
    pass


class NotFound(CallError):
    pass


_BY_CLASS = {
    "InvalidRequest": InvalidRequest,
    "Internal": Internal,
    "Unavailable": Unavailable,
    "Disconnected": Unavailable,
    "NotFound": NotFound,
}


def _error_for(error_class: str, message: str, error_type: Optional[str] = None) -> CallError:
    kind = _BY_CLASS.get(error_class, CallError)
    return kind(error_class, message, error_type)
