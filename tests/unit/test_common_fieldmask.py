"""servers.common.fieldmask: AIP-134 update masks, on the real far.gamed.v1.Game message."""

from __future__ import annotations

import pytest
from far.gamed.v1 import game_pb2
from google.protobuf.field_mask_pb2 import FieldMask

from servers.common.errors import FieldViolation, InvalidArgument
from servers.common.fieldmask import update_paths

UPDATABLE = frozenset({"display_name", "description", "genres", "state"})
Game = game_pb2.Game


def paths(mask_paths: list[str], game: Game | None = None) -> set[str]:
    return update_paths(FieldMask(paths=mask_paths), game or Game(), updatable=UPDATABLE)


class TestUpdatePaths:
    def test_snake_case(self) -> None:
        assert paths(["display_name", "genres"]) == {"display_name", "genres"}

    def test_camel_case(self) -> None:
        assert paths(["displayName", "description", "state"]) == {"display_name", "description", "state"}

    def test_duplicates_collapse(self) -> None:
        assert paths(["displayName", "display_name"]) == {"display_name"}

    def test_star_means_every_updatable_field(self) -> None:
        assert paths(["*"]) == UPDATABLE

    def test_empty_mask_means_the_populated_fields(self) -> None:
        assert paths([], Game(display_name="Chess", genres=["strategy"])) == {"display_name", "genres"}
        assert paths([], Game(description="d", state=Game.STATE_PUBLISHED)) == {"description", "state"}

    def test_empty_mask_ignores_populated_fields_that_cannot_be_updated(self) -> None:
        assert paths([], Game(name="games/chess", publisher="0xabc", etag="e")) == set()

    def test_unknown_and_not_updatable_paths_are_one_violation_each(self) -> None:
        with pytest.raises(InvalidArgument) as error:
            paths(["display_name", "color", "publisher", "createTime", "display_name.x", "state"])
        assert error.value.violations == [
            FieldViolation("update_mask.paths[1]", "'color' is not a field"),
            FieldViolation("update_mask.paths[2]", "'publisher' cannot be updated"),
            FieldViolation("update_mask.paths[3]", "'createTime' cannot be updated"),
            FieldViolation("update_mask.paths[4]", "'display_name.x' cannot be updated"),
        ]

    def test_violations_use_the_request_field_name(self) -> None:
        with pytest.raises(InvalidArgument) as error:
            update_paths(FieldMask(paths=["nope"]), Game(), updatable=UPDATABLE, field="mask")
        assert [v.field for v in error.value.violations] == ["mask.paths[0]"]
