"""The exception tree shared by every room; mapped to OpenAI error bodies once, in api/errors.py."""

from __future__ import annotations


class VLServeError(Exception):
    """Base of every error vlserve raises on purpose.

    ``status`` is the HTTP status it maps to, ``type`` the OpenAI error type, ``param`` the
    request field at fault (if any) and ``code`` a short machine-readable code.
    """

    status: int = 500
    type: str = "internal_error"
    code: str = "internal_error"  # every error carries a code (subclasses narrow it)
    retry_after_s: int | None = None  # sent as Retry-After when set
    field: str | None = None  # an engine refusal's subject, in the engine's words (engine/fields.py)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(VLServeError):
    """The request is malformed or asks for something unsupported (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class MediaError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted (400)."""

    code = "invalid_image"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens exceed the model's context (400)."""

    code = "context_length_exceeded"


class ClientTimeoutError(VLServeError):
    """The client sent its request head or body too slowly (408)."""

    status = 408
    type = "invalid_request_error"
    code = "body_timeout"


class AuthenticationError(VLServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(VLServeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowedError(VLServeError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLargeError(VLServeError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class HeadersTooLargeError(VLServeError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class OverloadedError(VLServeError):
    """The waiting queue is full (429); clients should retry after ``retry_after_s``."""

    status = 429
    type = "rate_limit_error"
    code = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class EngineError(VLServeError):
    """Generation failed inside the engine (500); the engine keeps serving others."""

    status = 500
    type = "internal_error"
    code = "engine_error"


class EngineUnavailableError(VLServeError):
    """The engine is loading, draining or dead (503)."""

    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(VLServeError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"


class DeviceUnavailableError(VLServeError):
    """The requested device cannot be used (fatal at startup)."""

    status = 503
    type = "service_unavailable"
    code = "device_unavailable"
