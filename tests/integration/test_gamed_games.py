"""far.gamed.v1 games: CreateGame, GetGame, ListGames, UpdateGame, DeleteGame against a real database."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from far.gamed.v1 import game_pb2, gamed_service_pb2

from tests.integration.gamed_support import (
    ARCHIVED,
    DRAFT,
    LINUX,
    PUBLISHED,
    WINDOWS,
    Auth,
    Caller,
    Stub,
    admin,
    anonymous,
    caller,
    outcome,
    publisher,
    unique_genre,
    unique_id,
    unique_word,
    user,
)
from tests.integration.rich_errors import expect_error

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def create_request(game_id: str, **game: object) -> gamed_service_pb2.CreateGameRequest:
    return gamed_service_pb2.CreateGameRequest(game_id=game_id, game=game_pb2.Game(**game))  # type: ignore[arg-type]


class TestCreateGame:
    async def test_publisher_creates_a_draft_owned_by_them(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game_id = unique_id()
        game = await gamed.CreateGame(
            create_request(
                game_id,
                display_name="  Star Forge  ",
                description="Build **ships**.",
                genres=["strategy", "sci-fi"],
                publisher="0x" + "ab" * 20,
                state=PUBLISHED,
                platforms=[WINDOWS],
            ),
            metadata=pub.metadata,
        )
        assert game.name == f"games/{game_id}"
        assert game.display_name == "Star Forge"
        assert game.description == "Build **ships**."
        assert list(game.genres) == ["strategy", "sci-fi"]
        assert game.publisher == pub.wallet
        assert game.state == DRAFT
        assert list(game.platforms) == []
        assert game.etag
        assert game.create_time.seconds > 0
        assert game.update_time == game.create_time
        assert await pub.get_game(game.name) == game

    async def test_admin_may_create(self, gamed: Stub, auth: Auth) -> None:
        boss = admin(gamed, auth)
        game = await boss.create_game(display_name="Admin Game")
        assert game.publisher == boss.wallet
        assert game.state == DRAFT

    async def test_wallet_in_the_token_is_lower_cased(self, gamed: Stub, auth: Auth) -> None:
        wallet = "0x" + "AbCd" * 10
        game = await caller(gamed, auth, "publisher", wallet=wallet).create_game()
        assert game.publisher == wallet.lower()

    async def test_plain_user_is_denied_with_missing_role(self, gamed: Stub, auth: Auth) -> None:
        game_id = unique_id()
        await expect_error(
            gamed.CreateGame(create_request(game_id, display_name="X"), metadata=user(gamed, auth).metadata),
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_ROLE",
        )
        await expect_error(
            gamed.GetGame(
                gamed_service_pb2.GetGameRequest(name=f"games/{game_id}"), metadata=admin(gamed, auth).metadata
            ),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )

    async def test_anonymous_caller_is_unauthenticated(self, gamed: Stub) -> None:
        await expect_error(
            gamed.CreateGame(create_request(unique_id(), display_name="X")), grpc.StatusCode.UNAUTHENTICATED
        )

    async def test_invalid_token_is_unauthenticated(self, gamed: Stub) -> None:
        await expect_error(
            gamed.CreateGame(
                create_request(unique_id(), display_name="X"), metadata=(("authorization", "Bearer not-a-jwt"),)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        )

    async def test_duplicate_id_already_exists(self, gamed: Stub, auth: Auth) -> None:
        first, second = publisher(gamed, auth), publisher(gamed, auth)
        game = await first.create_game(display_name="Original")
        game_id = game.name.removeprefix("games/")
        error = await expect_error(
            second.create_game(game_id, display_name="Copy"), grpc.StatusCode.ALREADY_EXISTS, "GAME_ALREADY_EXISTS"
        )
        assert error.info.metadata["resource"] == game.name
        assert (await first.get_game(game.name)).display_name == "Original"

    async def test_every_bad_field_is_listed(self, gamed: Stub, auth: Auth) -> None:
        await expect_error(
            publisher(gamed, auth).create_game(
                "9-starts-with-a-digit",
                display_name="   ",
                description="d" * 10_001,
                genres=["rpg", "Not Lower", "x" * 41, "rpg"],
            ),
            INVALID,
            fields=[
                "game_id",
                "game.display_name",
                "game.description",
                "game.genres[1]",
                "game.genres[2]",
                "game.genres",
            ],
        )

    @pytest.mark.parametrize(
        "game_id", ["", "Upper", "ends-with-", "under_score", "a" * 64, "has.dot", "-leading", "abc\n"], ids=repr
    )
    async def test_bad_game_id(self, gamed: Stub, auth: Auth, game_id: str) -> None:
        await expect_error(
            gamed.CreateGame(create_request(game_id, display_name="Fine"), metadata=publisher(gamed, auth).metadata),
            INVALID,
            fields=["game_id"],
        )

    async def test_longest_id_and_title_are_accepted(self, gamed: Stub, auth: Auth) -> None:
        game_id = unique_id("x" * 50)
        assert len(game_id) == 61
        game = await publisher(gamed, auth).create_game(game_id + "z9", display_name="t" * 200)
        assert game.name == f"games/{game_id}z9"

    @pytest.mark.parametrize("genre", ["rpg\n", "Rpg", "", "x" * 41, "1rpg", "r p g", "r\u00e9g"], ids=repr)
    async def test_bad_genre(self, gamed: Stub, auth: Auth, genre: str) -> None:
        await expect_error(
            publisher(gamed, auth).create_game(display_name="G", genres=["ok", genre]),
            INVALID,
            fields=["game.genres[1]"],
        )
        if genre:  # an empty genre filter means "any genre"
            await expect_error(anonymous(gamed).list_games(genre=genre), INVALID, fields=["genre"])

    async def test_too_many_genres(self, gamed: Stub, auth: Auth) -> None:
        await expect_error(
            publisher(gamed, auth).create_game(display_name="G", genres=[f"g{i}" for i in range(11)]),
            INVALID,
            fields=["game.genres"],
        )

    async def test_display_name_over_200_characters(self, gamed: Stub, auth: Auth) -> None:
        await expect_error(
            publisher(gamed, auth).create_game(display_name="t" * 201), INVALID, fields=["game.display_name"]
        )

    async def test_nul_characters_are_invalid(self, gamed: Stub, auth: Auth) -> None:
        # PostgreSQL text cannot hold U+0000; found by schemathesis as a 500 through Envoy.
        await expect_error(
            publisher(gamed, auth).create_game(display_name="\x00v^}", description="a\x00b"),
            INVALID,
            fields=["game.display_name", "game.description"],
        )


class TestGetGame:
    async def test_draft_is_visible_to_its_publisher_and_admins(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Secret")
        assert (await pub.get_game(game.name)).display_name == "Secret"
        assert (await admin(gamed, auth).get_game(game.name)).publisher == pub.wallet

    @pytest.mark.parametrize("state", [DRAFT, ARCHIVED], ids=["draft", "archived"])
    async def test_unpublished_game_does_not_exist_for_others(self, gamed: Stub, auth: Auth, state: int) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        if state == ARCHIVED:
            await pub.create_build(game.name)
            await pub.set_state(game.name, PUBLISHED)
            await pub.set_state(game.name, ARCHIVED)
        for other in (user(gamed, auth), publisher(gamed, auth), anonymous(gamed)):
            error = await expect_error(other.get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
            assert error.info.metadata["resource"] == game.name

    async def test_published_game_is_visible_to_everyone(self, gamed: Stub, auth: Auth) -> None:
        game = await publisher(gamed, auth).published_game(display_name="Open")
        for reader in (anonymous(gamed), user(gamed, auth), publisher(gamed, auth)):
            seen = await reader.get_game(game.name)
            assert seen.display_name == "Open"
            assert seen.state == PUBLISHED
            assert list(seen.platforms) == [WINDOWS]

    async def test_missing_game(self, gamed: Stub, auth: Auth) -> None:
        await expect_error(
            admin(gamed, auth).get_game(f"games/{unique_id()}"), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND"
        )

    @pytest.mark.parametrize("name", ["", "games/", "games/Bad", "game/abc", "games/abc/builds/x", "abc"], ids=repr)
    async def test_malformed_name(self, gamed: Stub, name: str) -> None:
        await expect_error(gamed.GetGame(gamed_service_pb2.GetGameRequest(name=name)), INVALID, fields=["name"])


class TestListGames:
    async def test_pages_cover_every_game_exactly_once(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        names = [(await pub.create_game(genres=[genre])).name for _ in range(5)]
        pages = await pub.list_all_games(page_size=2, genre=genre)
        assert [len(page) for page in pages] == [2, 2, 1]
        listed = [name for page in pages for name in page]
        assert listed == list(reversed(names))  # the default order, create_time desc

    async def test_exact_multiple_of_the_page_size_ends_with_an_empty_token(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        names = {(await pub.create_game(genres=[genre])).name for _ in range(4)}
        pages = await pub.list_all_games(page_size=2, genre=genre)
        assert [len(page) for page in pages] == [2, 2]
        assert {name for page in pages for name in page} == names

    async def test_page_size_default_and_maximum(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        for _ in range(21):
            await pub.create_game(genres=[genre])
        default = await pub.list_games(page_size=0, genre=genre)
        assert len(default.games) == 20
        assert default.next_page_token
        coerced = await pub.list_games(page_size=1000, genre=genre)
        assert len(coerced.games) == 21
        assert coerced.next_page_token == ""

    async def test_negative_page_size(self, gamed: Stub) -> None:
        await expect_error(anonymous(gamed).list_games(page_size=-1), INVALID, fields=["page_size"])

    async def test_tampered_token(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        for _ in range(3):
            await pub.create_game(genres=[genre])
        token = (await pub.list_games(page_size=1, genre=genre)).next_page_token
        assert token
        payload, _, mac = token.partition(".")
        flipped = payload[:5] + ("A" if payload[5] != "A" else "B") + payload[6:]
        for bad in (f"{flipped}.{mac}", f"{payload}.{mac[:-2]}", token + "x", "garbage", "a.b.c", "é.é"):
            await expect_error(pub.list_games(page_size=1, genre=genre, page_token=bad), INVALID, fields=["page_token"])

    async def test_token_only_works_with_the_same_filters_and_order(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        for _ in range(3):
            await pub.create_game(genres=[genre], display_name="Same")
        token = (await pub.list_games(page_size=1, genre=genre)).next_page_token
        for other in (
            {"genre": unique_genre()},
            {"genre": genre, "order_by": "display_name"},
            {"genre": genre, "state": DRAFT},
            {"genre": genre, "query": "same"},
            {"genre": genre, "platform": WINDOWS},
            {"genre": genre, "publisher": pub.wallet},
        ):
            await expect_error(pub.list_games(page_size=1, page_token=token, **other), INVALID, fields=["page_token"])
        second = await pub.list_games(page_size=1, page_token=token, genre=genre)
        assert len(second.games) == 1

    async def test_genre_filter(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre, other = unique_genre(), unique_genre()
        both = await pub.create_game(genres=[other, genre])
        only = await pub.create_game(genres=[genre])
        await pub.create_game(genres=[other])
        response = await pub.list_games(genre=genre)
        assert [g.name for g in response.games] == [only.name, both.name]

    async def test_publisher_filter(self, gamed: Stub, auth: Auth) -> None:
        first, second = publisher(gamed, auth), publisher(gamed, auth)
        genre = unique_genre()
        mine = await first.published_game(genres=[genre])
        await second.published_game(genres=[genre])
        for wallet in (first.wallet, first.wallet.upper().replace("0X", "0x"), f"  {first.wallet}  "):
            response = await anonymous(gamed).list_games(publisher=wallet, genre=genre)
            assert [g.name for g in response.games] == [mine.name]
        await expect_error(anonymous(gamed).list_games(publisher="0x1234"), INVALID, fields=["publisher"])

    async def test_state_filter(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        draft = await pub.create_game(genres=[genre])
        published = await pub.published_game(genres=[genre])
        archived = await pub.published_game(genres=[genre])
        await pub.set_state(archived.name, ARCHIVED)
        for state, expected in ((DRAFT, draft), (PUBLISHED, published), (ARCHIVED, archived)):
            response = await pub.list_games(genre=genre, state=state)
            assert [g.name for g in response.games] == [expected.name]
            assert response.games[0].state == state
        assert [g.name for g in (await anonymous(gamed).list_games(genre=genre, state=DRAFT)).games] == []
        assert [g.name for g in (await user(gamed, auth).list_games(genre=genre, state=ARCHIVED)).games] == []
        admin_view = await admin(gamed, auth).list_games(genre=genre, state=ARCHIVED)
        assert [g.name for g in admin_view.games] == [archived.name]
        await expect_error(pub.list_games(state=7), INVALID, fields=["state"])

    async def test_platform_filter(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        windows = await pub.create_game(genres=[genre])
        await pub.create_build(windows.name, platform=WINDOWS)
        linux = await pub.create_game(genres=[genre])
        await pub.create_build(linux.name, platform=LINUX)
        both = await pub.create_game(genres=[genre])
        await pub.create_build(both.name, platform=LINUX)
        await pub.create_build(both.name, platform=WINDOWS)
        await pub.create_game(genres=[genre])  # no builds at all
        response = await pub.list_games(genre=genre, platform=LINUX)
        assert [g.name for g in response.games] == [both.name, linux.name]
        assert [list(g.platforms) for g in response.games] == [[WINDOWS, LINUX], [LINUX]]
        response = await pub.list_games(genre=genre, platform=WINDOWS)
        assert [g.name for g in response.games] == [both.name, windows.name]
        assert (await pub.list_games(genre=genre, platform=game_pb2.PLATFORM_IOS)).games == []
        await expect_error(pub.list_games(platform=42), INVALID, fields=["platform"])

    async def test_query_needs_every_word_in_title_or_description(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        word = unique_word()
        in_description = await pub.create_game(display_name="Dragon Keep", description=f"A {word} castle siege.")
        in_title = await pub.create_game(display_name=f"{word.upper()} Castle", description="")
        split = await pub.create_game(display_name=f"The {word}", description="Storm the CASTLE walls")
        no_castle = await pub.create_game(display_name="Dragon", description=f"{word} but no fortress")
        await pub.create_game(display_name="Castle", description="nothing else")

        async def names(query: str) -> set[str]:
            return {g.name for g in (await pub.list_games(query=query, publisher=pub.wallet)).games}

        assert await names(f"{word} castle") == {in_description.name, in_title.name, split.name}
        assert await names(f"CASTLE {word.upper()}") == {in_description.name, in_title.name, split.name}
        assert await names(f"{word} dragon") == {in_description.name, no_castle.name}
        assert await names(f"{word} siege") == {in_description.name}
        assert await names(f"{word} {unique_word()}") == set()
        await expect_error(pub.list_games(query="q" * 201), INVALID, fields=["query"])

    @pytest.mark.parametrize(
        "order_by", ["create_time desc", "create_time", "display_name", "update_time desc", "  update_time   desc "]
    )
    async def test_order_by(self, gamed: Stub, auth: Auth, order_by: str) -> None:
        pub = publisher(gamed, auth)
        genre = unique_genre()
        created = []
        for title in ("Delta", "Alpha", "Echo", "Bravo", "Alpha"):
            created.append(await pub.create_game(genres=[genre], display_name=title))
        touched = created[1]
        await pub.update_game(game_pb2.Game(name=touched.name, description="touched"), "description")
        await pub.create_build(created[3].name)  # a new build changes the game's update_time too
        names = [g.name for g in created]
        expected = {
            "create_time desc": list(reversed(names)),
            "create_time": names,
            "display_name": [
                *sorted([names[1], names[4]]),
                names[3],
                names[0],
                names[2],
            ],
            "update_time desc": [names[3], names[1], names[4], names[2], names[0]],
        }[" ".join(order_by.lower().split())]
        pages = await pub.list_all_games(page_size=1, genre=genre, order_by=order_by)  # ties cross pages
        assert [name for page in pages for name in page] == expected

    @pytest.mark.parametrize("order_by", ["name", "create_time asc", "display_name desc", "update_time", "rating"])
    async def test_unknown_order_by(self, gamed: Stub, order_by: str) -> None:
        await expect_error(anonymous(gamed).list_games(order_by=order_by), INVALID, fields=["order_by"])

    async def test_visibility(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        genre = unique_genre()
        draft = await owner.create_game(genres=[genre])
        published = await owner.published_game(genres=[genre])
        archived = await owner.published_game(genres=[genre])
        await owner.set_state(archived.name, ARCHIVED)
        other_publisher = publisher(gamed, auth)
        others_draft = await other_publisher.create_game(genres=[genre])

        async def names(reader: Caller) -> list[str]:
            return [g.name for g in (await reader.list_games(genre=genre)).games]

        assert await names(anonymous(gamed)) == [published.name]
        assert await names(user(gamed, auth)) == [published.name]
        assert await names(owner) == [archived.name, published.name, draft.name]
        assert await names(other_publisher) == [others_draft.name, published.name]
        assert await names(admin(gamed, auth)) == [others_draft.name, archived.name, published.name, draft.name]

    async def test_nul_in_query_is_invalid(self, gamed: Stub) -> None:
        await expect_error(anonymous(gamed).list_games(query="chess\x00"), INVALID, fields=["query"])

    async def test_every_bad_filter_is_listed(self, gamed: Stub) -> None:
        await expect_error(
            anonymous(gamed).list_games(order_by="nope", genre="Bad Genre", platform=99, state=9, query="q" * 300),
            INVALID,
            fields=["order_by", "genre", "platform", "state", "query"],
        )


class TestUpdateGame:
    async def test_mask_limits_the_change(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Old", description="old text", genres=["rpg"])
        updated = await pub.update_game(
            game_pb2.Game(name=game.name, display_name="New", description="ignored", genres=["ignored"]),
            "display_name",
        )
        assert (updated.display_name, updated.description, list(updated.genres)) == ("New", "old text", ["rpg"])
        assert updated == await pub.get_game(game.name)

    async def test_camel_case_paths(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Old", description="keep", genres=["rpg"])
        updated = await pub.update_game(
            game_pb2.Game(name=game.name, display_name="Camel", genres=["puzzle", "casual"], description="no"),
            "displayName",
            "genres",
        )
        assert (updated.display_name, updated.description, list(updated.genres)) == (
            "Camel",
            "keep",
            ["puzzle", "casual"],
        )

    async def test_masked_field_may_be_cleared(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(description="text", genres=["rpg"])
        updated = await pub.update_game(game_pb2.Game(name=game.name), "description", "genres")
        assert (updated.description, list(updated.genres)) == ("", [])

    async def test_empty_mask_updates_the_populated_fields(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Title", description="old", genres=["rpg"])
        updated = await pub.update_game(game_pb2.Game(name=game.name, description="new"))
        assert (updated.display_name, updated.description, list(updated.genres), updated.state) == (
            "Title",
            "new",
            ["rpg"],
            DRAFT,
        )

    async def test_star_mask_replaces_every_updatable_field(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game(display_name="Title", description="old", genres=["rpg"])
        updated = await pub.update_game(game_pb2.Game(name=game.name, display_name="T2", state=ARCHIVED), "*")
        assert (updated.display_name, updated.description, list(updated.genres), updated.state) == (
            "T2",
            "",
            [],
            ARCHIVED,
        )

    @pytest.mark.parametrize("mask", [["*"], ["state"], ["display_name", "state"]])
    async def test_unset_state_leaves_the_state_as_it_is(self, gamed: Stub, auth: Auth, mask: list[str]) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game(display_name="Title")
        updated = await pub.update_game(game_pb2.Game(name=game.name, display_name="Renamed"), *mask)
        assert updated.state == PUBLISHED
        assert updated.display_name == ("Title" if mask == ["state"] else "Renamed")

    @pytest.mark.parametrize(
        ("paths", "fields"),
        [
            (["colour"], ["update_mask.paths[0]"]),
            (["publisher"], ["update_mask.paths[0]"]),
            (["display_name", "createTime", "etag", "platforms"], [f"update_mask.paths[{i}]" for i in (1, 2, 3)]),
            (["name"], ["update_mask.paths[0]"]),
        ],
    )
    async def test_unknown_or_output_only_path(
        self, gamed: Stub, auth: Auth, paths: list[str], fields: list[str]
    ) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Same")
        await expect_error(
            pub.update_game(game_pb2.Game(name=game.name, display_name="Changed"), *paths), INVALID, fields=fields
        )
        assert (await pub.get_game(game.name)).display_name == "Same"

    async def test_bad_values(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        bad = game_pb2.Game(name=game.name, genres=["OK?"], state=9)  # type: ignore[arg-type]
        await expect_error(
            pub.update_game(bad, "display_name", "genres", "state"),
            INVALID,
            fields=["game.display_name", "game.genres[0]", "game.state"],
        )
        assert await pub.get_game(game.name) == game

    async def test_nul_characters_are_invalid(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        bad = game_pb2.Game(name=game.name, display_name="\x00", description="\x00")
        await expect_error(
            pub.update_game(bad, "display_name", "description"),
            INVALID,
            fields=["game.display_name", "game.description"],
        )

    async def test_etag_changes_and_stale_etag_is_aborted(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="v1")
        first = await pub.update_game(game_pb2.Game(name=game.name, display_name="v2", etag=game.etag), "display_name")
        assert first.etag != game.etag
        assert first.update_time.ToDatetime() > game.update_time.ToDatetime()
        await expect_error(
            pub.update_game(game_pb2.Game(name=game.name, display_name="v3", etag=game.etag), "display_name"),
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
        )
        current = await pub.get_game(game.name)
        assert (current.display_name, current.etag) == ("v2", first.etag)
        second = await pub.update_game(
            game_pb2.Game(name=game.name, display_name="v3", etag=first.etag), "display_name"
        )
        assert second.display_name == "v3"
        assert second.etag not in (game.etag, first.etag)

    async def test_new_build_changes_the_etag(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_build(game.name)
        await expect_error(
            pub.update_game(game_pb2.Game(name=game.name, display_name="x", etag=game.etag), "display_name"),
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
        )

    async def test_update_that_changes_nothing_keeps_the_etag(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game(display_name="Same")
        updated = await pub.update_game(game_pb2.Game(name=game.name, display_name="Same"), "display_name")
        assert updated.etag == game.etag
        assert updated.update_time == game.update_time

    async def test_publish_needs_a_build(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await expect_error(pub.set_state(game.name, PUBLISHED), grpc.StatusCode.FAILED_PRECONDITION, "NO_BUILDS")
        assert (await pub.get_game(game.name)).state == DRAFT
        await pub.create_build(game.name)
        published = await pub.set_state(game.name, PUBLISHED)
        assert published.state == PUBLISHED
        assert (await anonymous(gamed).get_game(game.name)).state == PUBLISHED
        archived = await pub.set_state(game.name, ARCHIVED)
        assert archived.state == ARCHIVED
        await expect_error(anonymous(gamed).get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")

    async def test_other_publisher_is_denied(self, gamed: Stub, auth: Auth) -> None:
        owner, other = publisher(gamed, auth), publisher(gamed, auth)
        published = await owner.published_game(display_name="Mine")
        await expect_error(
            other.update_game(game_pb2.Game(name=published.name, display_name="Stolen"), "display_name"),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        draft = await owner.create_game()
        await expect_error(
            other.update_game(game_pb2.Game(name=draft.name, display_name="Stolen"), "display_name"),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )
        await expect_error(
            anonymous(gamed).update_game(game_pb2.Game(name=published.name, display_name="Stolen"), "display_name"),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert (await owner.get_game(published.name)).display_name == "Mine"

    async def test_admin_may_update_any_game(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        game = await owner.create_game()
        updated = await admin(gamed, auth).update_game(
            game_pb2.Game(name=game.name, display_name="Fixed"), "displayName"
        )
        assert updated.display_name == "Fixed"
        assert updated.publisher == owner.wallet

    async def test_malformed_or_missing_name(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        await expect_error(
            pub.update_game(game_pb2.Game(name="nope", display_name="x"), "display_name"), INVALID, fields=["game.name"]
        )
        await expect_error(
            pub.update_game(game_pb2.Game(name=f"games/{unique_id()}", display_name="x"), "display_name"),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )

    async def test_racing_updates_with_one_etag(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        for _ in range(5):
            game = await pub.create_game()
            results = await asyncio.gather(
                *(
                    outcome(pub.update_game(game_pb2.Game(name=game.name, display_name=f"v{i}", etag=game.etag)))
                    for i in range(3)
                )
            )
            assert sorted(results) == ["ABORTED/ETAG_MISMATCH", "ABORTED/ETAG_MISMATCH", "OK"]
            winner = results.index("OK")
            assert (await pub.get_game(game.name)).display_name == f"v{winner}"


class TestDeleteGame:
    async def test_published_game_must_be_archived_first(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.published_game()
        await expect_error(
            gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=game.name), metadata=pub.metadata),
            grpc.StatusCode.FAILED_PRECONDITION,
            "GAME_PUBLISHED",
        )
        assert (await anonymous(gamed).get_game(game.name)).state == PUBLISHED

    async def test_archived_game_goes_with_its_builds_channels_and_releases(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        game_id = game.name.removeprefix("games/")
        build = await pub.create_build(game.name, build_id="first")
        channel = await pub.create_channel(game.name, "stable")
        await pub.promote(channel.name, build.name)
        await pub.set_state(game.name, PUBLISHED)
        await pub.set_state(game.name, ARCHIVED)

        await gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=game.name), metadata=pub.metadata)

        boss = admin(gamed, auth)
        await expect_error(boss.get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
        await expect_error(
            gamed.GetBuild(gamed_service_pb2.GetBuildRequest(name=build.name), metadata=boss.metadata),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )
        await expect_error(
            gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=game.name), metadata=pub.metadata),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )
        # The id is free again and nothing of the old game comes back with it.
        again = await pub.create_game(game_id)
        assert list(again.platforms) == []
        builds = await gamed.ListBuilds(gamed_service_pb2.ListBuildsRequest(parent=game.name), metadata=pub.metadata)
        assert list(builds.builds) == []
        channels = await gamed.ListChannels(
            gamed_service_pb2.ListChannelsRequest(parent=game.name), metadata=pub.metadata
        )
        assert list(channels.channels) == []
        recreated = await pub.create_channel(game.name, "stable")
        assert list(recreated.current_releases) == []
        assert await pub.releases(recreated.name) == []

    async def test_draft_game_is_deleted(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        await pub.create_build(game.name)
        await pub.create_channel(game.name, "beta")
        await gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=game.name), metadata=pub.metadata)
        await expect_error(pub.get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")

    async def test_etag(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        game = await pub.create_game()
        changed = await pub.update_game(game_pb2.Game(name=game.name, description="changed"), "description")
        await expect_error(
            gamed.DeleteGame(
                gamed_service_pb2.DeleteGameRequest(name=game.name, etag=game.etag), metadata=pub.metadata
            ),
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
        )
        await gamed.DeleteGame(
            gamed_service_pb2.DeleteGameRequest(name=game.name, etag=changed.etag), metadata=pub.metadata
        )
        await expect_error(pub.get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")

    async def test_only_the_publisher_or_an_admin_may_delete(self, gamed: Stub, auth: Auth) -> None:
        owner = publisher(gamed, auth)
        draft = await owner.create_game()
        published = await owner.published_game()
        other = publisher(gamed, auth)
        await expect_error(
            gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=draft.name), metadata=other.metadata),
            grpc.StatusCode.NOT_FOUND,
            "GAME_NOT_FOUND",
        )
        await expect_error(
            gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=published.name), metadata=other.metadata),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        await expect_error(
            gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=published.name)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await gamed.DeleteGame(
            gamed_service_pb2.DeleteGameRequest(name=draft.name), metadata=admin(gamed, auth).metadata
        )
        await expect_error(owner.get_game(draft.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")

    async def test_malformed_name(self, gamed: Stub, auth: Auth) -> None:
        await expect_error(
            gamed.DeleteGame(
                gamed_service_pb2.DeleteGameRequest(name="games/UPPER"), metadata=admin(gamed, auth).metadata
            ),
            INVALID,
            fields=["name"],
        )

    async def test_racing_channel_writes(self, gamed: Stub, auth: Auth) -> None:
        pub = publisher(gamed, auth)
        for _ in range(5):
            game = await pub.create_game()
            old = await pub.create_build(game.name, version="1.0.0")
            new = await pub.create_build(game.name, version="1.1.0")
            stable = await pub.create_channel(game.name, "stable")
            await pub.promote(stable.name, old.name)
            delete = gamed.DeleteGame(gamed_service_pb2.DeleteGameRequest(name=game.name), metadata=pub.metadata)
            results = await asyncio.gather(
                outcome(delete),
                outcome(pub.promote(stable.name, new.name)),
                outcome(pub.create_channel(game.name, "beta")),
            )
            assert results[0] == "OK"
            assert set(results[1:]) <= {"OK", "NOT_FOUND/GAME_NOT_FOUND"}, results
            await expect_error(pub.get_game(game.name), grpc.StatusCode.NOT_FOUND, "GAME_NOT_FOUND")
