"""Input rules shared by HTTP, WebSocket and gRPC: user ids, game names, amounts."""

import json
import re

from errors import ServiceError

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ValidationError(ServiceError, ValueError):
    """Bad client input; the message names the field and says what is wrong."""

    code = "invalid_request"


def _is_int(value):
    # bool is a subclass of int, but `true` is not an amount or a user id.
    return isinstance(value, int) and not isinstance(value, bool)


def is_user_id(value: object) -> bool:
    """Whether `value` is a user id as a string: 1 to 64 characters from A-Z a-z 0-9 _ -."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def validate_user_id(value: object, field: str = "user_id") -> str:
    """Return the canonical (string) user id or raise ValidationError naming `field`.

    A positive integer (as JSON bodies may give) means its decimal string; path segments, query values
    and gRPC fields are strings already.
    """
    if _is_int(value):
        if value < 1:
            raise ValidationError(f"{field} must be a positive integer or 1 to 64 characters A-Z a-z 0-9 _ -")
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string of 1 to 64 characters A-Z a-z 0-9 _ -")
    if not _NAME.fullmatch(value):
        raise ValidationError(f"{field} must be 1 to 64 characters from A-Z a-z 0-9 _ -")
    return value


def validate_game(value: object, field: str = "game") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValidationError(f"{field} must be a string of 1 to 64 characters from A-Z a-z 0-9 _ -")
    return value


def validate_amount(value: object, field: str = "amount", minimum: int = 1) -> int:
    """Return an integer amount in cents within [minimum, 2**63-1] or raise."""
    if not _is_int(value):
        raise ValidationError(f"{field} must be an integer number of cents")
    if value < minimum:
        raise ValidationError(f"{field} must be at least {minimum}")
    if value > INT64_MAX:
        raise ValidationError(f"{field} must be at most {INT64_MAX}")
    return value


def validate_limit(raw: str | None, field: str = "limit", default: int = 50, maximum: int = 1000) -> int:
    """Parse a query-string limit (a decimal string) within 1..maximum."""
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= maximum:
        raise ValidationError(f"{field} must be an integer from 1 to {maximum}")
    return int(raw)


_HUGE = 10**64  # stands in for integer literals too long to convert; every field rejects it by name


def _parse_int(text):
    # Python refuses to convert more than 4300 digits; such a literal is valid JSON, just an invalid value.
    return int(text) if len(text) <= 100 else (-_HUGE if text.startswith("-") else _HUGE)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with options builds a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int)


def parse_json(data: str | bytes) -> object:
    """Parse a client's JSON text (str, or bytes as strict UTF-8); ValueError or RecursionError if it is not JSON.

    NaN and Infinity are refused; integer literals too long to convert parse as an out-of-range value.
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8")  # strictly: json.loads on bytes would let encoded surrogates through
    if data.startswith("\ufeff"):
        raise ValueError("a byte order mark is not JSON")  # as json.loads refuses it
    return _DECODER.decode(data)
