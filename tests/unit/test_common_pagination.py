"""servers.common.pagination: AIP-158 page sizes and tamper-proof page tokens."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageTokens, page_size

TOKENS = PageTokens(b"k" * 32)
SCOPE = PageTokens.scope("games", "state=PUBLISHED", "order_by=display_name")
TOKEN_ERROR = FieldViolation("page_token", "is not a token this list returned for these parameters")

cursors = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none()),
    max_size=4,
)


def assert_invalid(token: str, *, tokens: PageTokens = TOKENS, scope: str = SCOPE) -> None:
    with pytest.raises(InvalidArgument) as error:
        tokens.decode(token, scope=scope)
    assert error.value.violations == [TOKEN_ERROR]


class TestPageSize:
    def test_zero_is_the_default(self) -> None:
        assert page_size(0) == DEFAULT_PAGE_SIZE == 20
        assert page_size(0, default=5) == 5

    @pytest.mark.parametrize(("value", "expected"), [(1, 1), (100, 100), (101, 100), (10**9, 100)])
    def test_over_the_maximum_is_coerced_down(self, value: int, expected: int) -> None:
        assert page_size(value) == expected
        assert MAX_PAGE_SIZE == 100

    def test_custom_maximum(self) -> None:
        assert page_size(500, maximum=250) == 250

    def test_negative_is_invalid(self) -> None:
        with pytest.raises(InvalidArgument) as error:
            page_size(-1)
        assert error.value.violations == [FieldViolation("page_size", "must not be negative")]


class TestPageTokens:
    @given(cursors)
    def test_round_trip(self, cursor: dict[str, Any]) -> None:
        token = TOKENS.encode(cursor, scope=SCOPE)
        assert token.isascii()
        assert "=" not in token
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
        assert TOKENS.decode(token, scope=SCOPE) == cursor

    def test_empty_token_is_the_first_page(self) -> None:
        assert TOKENS.decode("", scope=SCOPE) is None

    @given(cursors, st.data())
    def test_any_single_changed_character_is_rejected(self, cursor: dict[str, Any], data: st.DataObject) -> None:
        token = TOKENS.encode(cursor, scope=SCOPE)
        index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
        replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[index]))
        assert_invalid(token[:index] + replacement + token[index + 1 :])

    @pytest.mark.parametrize("cursor", [{"id": "chess"}, {"id": "go", "n": 12345}, {}])
    def test_every_substitution_from_the_token_alphabet_is_rejected(self, cursor: dict[str, Any]) -> None:
        # Exhaustive for the characters a token is made of: base64 ignores the unused low bits of the
        # last character of each part, so only a canonical-encoding check catches those.
        token = TOKENS.encode(cursor, scope=SCOPE)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="
        accepted = []
        for index, original in enumerate(token):
            for replacement in alphabet.replace(original, ""):
                changed = token[:index] + replacement + token[index + 1 :]
                try:
                    TOKENS.decode(changed, scope=SCOPE)
                except InvalidArgument:
                    continue
                accepted.append(changed)
        assert accepted == []

    def test_another_scope_is_rejected(self) -> None:
        token = TOKENS.encode({"id": "chess"}, scope=SCOPE)
        assert_invalid(token, scope=PageTokens.scope("games", "state=DRAFT", "order_by=display_name"))

    def test_another_secret_is_rejected(self) -> None:
        token = PageTokens(b"other-secret-0123456789").encode({"id": "chess"}, scope=SCOPE)
        assert_invalid(token)

    def test_scope_depends_on_every_part_and_its_order(self) -> None:
        assert PageTokens.scope("a", 1) == PageTokens.scope("a", 1)
        assert len({PageTokens.scope("a", 1), PageTokens.scope(1, "a"), PageTokens.scope("a", "1")}) == 3

    @pytest.mark.parametrize(
        "token",
        ["no-dot", ".", "abc.", ".abc", "!!!.???", "a.b.c", "é.é", "YQ.YQ", "a" * 5 + "." + "b" * 5, " "],
    )
    def test_garbage_is_invalid_argument(self, token: str) -> None:
        assert_invalid(token)

    @given(st.text(min_size=1))
    def test_arbitrary_text_is_invalid_argument_and_nothing_else(self, token: str) -> None:
        assert_invalid(token)

    def test_short_secret_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 16 bytes"):
            PageTokens(b"short")
