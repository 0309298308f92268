"""servers.common.validation and servers.common.names: resource ids, wallets, resource names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.names import format_name, parse_name
from servers.common.validation import RESOURCE_ID, RESOURCE_ID_RULE, SHA256_HEX, Violations, normalize_wallet

LOWER = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

valid_ids = st.one_of(
    st.sampled_from(LOWER),
    st.builds(
        lambda first, middle, last: first + middle + last,
        st.sampled_from(LOWER),
        st.text(alphabet=LOWER + DIGITS + "-", max_size=61),
        st.sampled_from(LOWER + DIGITS),
    ),
)


def is_valid_id(value: str) -> bool:
    return RESOURCE_ID.match(value) is not None


class TestResourceId:
    @given(valid_ids)
    def test_every_valid_id_matches(self, value: str) -> None:
        assert 1 <= len(value) <= 63
        assert is_valid_id(value)

    @given(valid_ids, st.integers(min_value=0, max_value=62), st.sampled_from("ABCXYZ"))
    def test_upper_case_is_rejected(self, value: str, position: int, letter: str) -> None:
        position = min(position, len(value) - 1)
        assert not is_valid_id(value[:position] + letter + value[position + 1 :])

    @given(st.sampled_from(DIGITS + "-"), valid_ids)
    def test_leading_digit_or_hyphen_is_rejected(self, first: str, value: str) -> None:
        assert not is_valid_id(first + value[1:])

    @given(valid_ids)
    def test_trailing_hyphen_is_rejected(self, value: str) -> None:
        assert not is_valid_id(value[:62] + "-")

    @given(st.text(alphabet=LOWER + DIGITS, min_size=63, max_size=100))
    def test_longer_than_63_is_rejected(self, tail: str) -> None:
        assert not is_valid_id("a" + tail)

    @pytest.mark.parametrize("value", ["", "a_b", "a.b", "a b", "é", "abc\n", "\nabc", "abc "])
    def test_other_characters_are_rejected(self, value: str) -> None:
        assert not is_valid_id(value)

    @pytest.mark.parametrize("value", ["a", "a1", "chess", "my-game-2", "a" * 63, "a--b"])
    def test_examples_are_accepted(self, value: str) -> None:
        assert is_valid_id(value)

    def test_sha256_needs_exactly_64_lower_hex(self) -> None:
        assert SHA256_HEX.match("ab" * 32)
        assert not SHA256_HEX.match("ab" * 32 + "\n")
        assert not SHA256_HEX.match("AB" * 32)


class TestViolations:
    def test_collects_every_bad_field_into_one_error(self) -> None:
        violations = Violations()
        assert violations.require("", "game.display_name") is False
        assert violations.require("Chess", "game.description") is True
        violations.check_length("x" * 5, "game.description", maximum=4)
        violations.check_length("ok", "game.genres[0]", minimum=1, maximum=40)
        violations.check_resource_id("Bad", "game_id")
        with pytest.raises(InvalidArgument) as error:
            violations.raise_if_any()
        assert error.value.violations == [
            FieldViolation("game.display_name", "is required"),
            FieldViolation("game.description", "must be 0-4 characters long (got 5)"),
            FieldViolation("game_id", RESOURCE_ID_RULE),
        ]
        assert error.value.message == "the request has invalid fields: game.display_name, game.description, game_id"

    def test_nothing_to_raise(self) -> None:
        violations = Violations()
        violations.check_resource_id("chess", "game_id")
        violations.raise_if_any()
        assert violations.items == []


class TestNormalizeWallet:
    def test_canonical_form(self) -> None:
        address = "0x" + "AbCdEf0123" * 4
        assert normalize_wallet(f"  {address} ", "wallet") == address.lower()

    @pytest.mark.parametrize(
        "value",
        ["", "0x", "0x" + "a" * 39, "0x" + "a" * 41, "a" * 42, "0x" + "g" * 40, "0X" + "a" * 40 + "\n" + "b"],
    )
    def test_rejected_with_the_field_name(self, value: str) -> None:
        with pytest.raises(InvalidArgument) as error:
            normalize_wallet(value, "record.player")
        assert [v.field for v in error.value.violations] == ["record.player"]


BUILD = "games/{game}/builds/{build}"


class TestNames:
    @given(valid_ids, valid_ids)
    def test_format_then_parse_round_trips(self, game: str, build: str) -> None:
        name = format_name(BUILD, game=game, build=build)
        assert name == f"games/{game}/builds/{build}"
        assert parse_name(BUILD, name) == {"game": game, "build": build}

    @pytest.mark.parametrize(
        "name",
        [
            "games/chess",
            "games/chess/builds/",
            "games/Chess/builds/b1",
            "games/chess/build/b1",
            "games/chess/builds/b1/",
            "/games/chess/builds/b1",
            "games/chess/builds/b1\n",
            "games/chess/builds/b-",
        ],
    )
    def test_bad_names_name_the_field(self, name: str) -> None:
        with pytest.raises(InvalidArgument) as error:
            parse_name(BUILD, name, field="build.name")
        [violation] = error.value.violations
        assert violation.field == "build.name"
        assert BUILD in violation.description

    def test_empty_name_is_required(self) -> None:
        with pytest.raises(InvalidArgument) as error:
            parse_name("games/{game}", "")
        assert error.value.violations == [FieldViolation("name", "is required (format games/{game})")]
