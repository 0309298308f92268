"""Resource names (AIP-122): parse `games/{game}/builds/{build}` patterns into ids, and format them back."""

from __future__ import annotations

import re
from functools import cache

from servers.common.errors import InvalidArgument
from servers.common.validation import RESOURCE_ID_RULE

_SEGMENT = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"


@cache
def _compile(pattern: str) -> re.Pattern[str]:
    parts = []
    for segment in pattern.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            parts.append(f"(?P<{segment[1:-1]}>{_SEGMENT})")
        else:
            parts.append(re.escape(segment))
    return re.compile("^" + "/".join(parts) + r"\Z")


def parse_name(pattern: str, name: str, *, field: str = "name") -> dict[str, str]:
    """The ids in `name` for `pattern` (`games/{game}`), or INVALID_ARGUMENT naming `field`."""
    match = _compile(pattern).match(name)
    if match is None:
        if not name:
            raise InvalidArgument.field(field, f"is required (format {pattern})")
        raise InvalidArgument.field(field, f"must have the format {pattern}; each id {RESOURCE_ID_RULE}")
    return match.groupdict()


def format_name(pattern: str, **ids: str) -> str:
    """`format_name("games/{game}", game="chess")` -> `games/chess`."""
    return pattern.format(**ids)
