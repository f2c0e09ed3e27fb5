"""The error envelope of the contract, in one place for HTTP, WebSocket, the HTTP server and gRPC.

A refusal is a ServiceError carrying a contract code (`insufficient_funds`, `unauthorized`, ...) and a
message; each front end maps the code to its own status with the tables below.
"""

import json
from typing import Any

import grpc

# Contract code -> HTTP status (CONTRACT.md section 3).
HTTP_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "insufficient_funds": 409,
    "balance_limit_exceeded": 409,
    "payload_too_large": 413,
    "idempotency_key_reused": 422,
    "internal_error": 500,
    "unavailable": 503,
}

# HTTP status -> the code answered for it when nothing more specific is known (werkzeug, http.server).
CODE_OF_STATUS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 413: "payload_too_large", 422: "idempotency_key_reused",
                  500: "internal_error", 503: "unavailable"}

# Contract code -> gRPC status.
GRPC_STATUS = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal_error": grpc.StatusCode.INTERNAL,
}


class ServiceError(Exception):
    """A refused request: a contract code, a message for the client and optional extra body fields."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.extra = extra

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict:
        return envelope(self.code, self.message, **self.extra)


def envelope(code: str, message: str, **extra: Any) -> dict:
    """The contract's error body: {"error": CODE, "message": TEXT, ...extra}."""
    return {"error": code, "message": message, **extra}


def dumps(obj: Any) -> str:
    """Compact JSON, ASCII-escaped, so any client text (even a lone surrogate) always encodes."""
    return json.dumps(obj, separators=(",", ":"))


def error_json(code: str, message: str, **extra: Any) -> bytes:
    return dumps(envelope(code, message, **extra)).encode()
