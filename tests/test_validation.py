"""Unit tests for validation.py: user ids, game names, amounts and the `limit` query value."""

import pytest

from validation import INT64_MAX, ValidationError, validate_amount, validate_game, validate_limit, validate_user_id

NAME_OK = ["a", "A", "0", "_", "-", "user_42", "Player-One", "x" * 64, "abcXYZ019_-"]
NAME_BAD = [
    "",  # empty
    "x" * 65,  # too long
    "a b",  # space
    "a\n",  # trailing newline ($ in a regex would let this through)
    "\na",
    "é",  # unicode letter
    "ünïcode",
    "١٢٣",  # Arabic-Indic digits: \d would accept them
    "a.b",
    "a/b",
    "a\x00",
    " a",
]


# -- user ids ---------------------------------------------------------------


@pytest.mark.parametrize("value", NAME_OK)
def test_user_id_accepts_names(value):
    assert validate_user_id(value) == value


@pytest.mark.parametrize("value,expected", [(1, "1"), (42, "42"), (10**20, "100000000000000000000")])
def test_user_id_positive_int_means_its_decimal_string(value, expected):
    assert validate_user_id(value) == expected


def test_user_id_int_and_string_are_the_same_user():
    assert validate_user_id(42) == validate_user_id("42")


@pytest.mark.parametrize("value", NAME_BAD)
def test_user_id_rejects_bad_strings(value):
    with pytest.raises(ValidationError, match="user_id"):
        validate_user_id(value)


@pytest.mark.parametrize("value", [0, -1, -(2**63), True, False, 1.0, 1.5, None, [], ["a"], {}, b"abc", 10**64])
def test_user_id_rejects_non_names(value):
    with pytest.raises(ValidationError, match="user_id"):
        validate_user_id(value)


def test_user_id_error_names_the_given_field():
    with pytest.raises(ValidationError, match="owner"):
        validate_user_id("a b", field="owner")


def test_validation_error_is_a_value_error():
    assert issubclass(ValidationError, ValueError)


# -- game names -------------------------------------------------------------


@pytest.mark.parametrize("value", NAME_OK)
def test_game_accepts_names(value):
    assert validate_game(value) == value


@pytest.mark.parametrize("value", [*NAME_BAD, None, 7, True, 1.0, ["slots"]])
def test_game_rejects_bad_names(value):
    with pytest.raises(ValidationError, match="game"):
        validate_game(value)


# -- amounts ----------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 2, 100, INT64_MAX])
def test_amount_accepts_positive_int64(value):
    assert validate_amount(value) == value


def test_int64_max_constant():
    assert INT64_MAX == 2**63 - 1


@pytest.mark.parametrize("value", [0, -1, -(2**63)])
def test_amount_rejects_below_minimum(value):
    with pytest.raises(ValidationError, match="amount must be at least 1"):
        validate_amount(value)


@pytest.mark.parametrize("value", [2**63, 2**64, 10**30])
def test_amount_rejects_beyond_int64(value):
    with pytest.raises(ValidationError, match="amount must be at most"):
        validate_amount(value)


@pytest.mark.parametrize("value", [True, False, 1.0, 100.0, 1e2, float("inf"), float("nan"), "1", "", None, [1], {}])
def test_amount_rejects_non_integers(value):
    with pytest.raises(ValidationError, match="amount must be an integer"):
        validate_amount(value)


def test_amount_minimum_zero_allows_zero_only_when_asked():
    assert validate_amount(0, field="bet", minimum=0) == 0
    assert validate_amount(INT64_MAX, field="payout", minimum=0) == INT64_MAX
    with pytest.raises(ValidationError, match="bet"):
        validate_amount(-1, field="bet", minimum=0)
    with pytest.raises(ValidationError, match="payout"):
        validate_amount(False, field="payout", minimum=0)


# -- limit query ------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [(None, 50), ("1", 1), ("50", 50), ("999", 999), ("1000", 1000)])
def test_limit_accepts_1_to_1000(raw, expected):
    assert validate_limit(raw) == expected


@pytest.mark.parametrize(
    "raw", ["0", "1001", "-1", "abc", "1.5", "", " 5", "5 ", "5\n", "+5", "1e2", "0x10", "١", "99999999999"]
)
def test_limit_rejects_bad_values(raw):
    with pytest.raises(ValidationError, match="limit"):
        validate_limit(raw)


# -- JSON text ----------------------------------------------------------------


@pytest.mark.parametrize("text", [b"\xef\xbb\xbf{}", "\ufeff{}", b"NaN", b"[Infinity]", b"{} x", b"\xff{}", b""])
def test_parse_json_refuses_what_is_not_json(text):
    from validation import parse_json
    with pytest.raises(ValueError):
        parse_json(text)


@pytest.mark.parametrize("text, value", [(b' {"a": [1, -2]} ', {"a": [1, -2]}), ("1" + "0" * 200, 10**64),
                                         (b'"caf\xc3\xa9"', "caf\u00e9")])
def test_parse_json_parses_json_with_oversized_integers_out_of_range(text, value):
    from validation import parse_json
    assert parse_json(text) == value
