"""Every RPC of every FAR service declares who may call it (`(far.api.v1.access)`, protos/far/api/v1/access.proto).

The walk reads `generated/descriptors/far.binpb`, the descriptor set Envoy loads, so a contract that is
changed without `make generate` is caught by `generate --check` and one without declarations here.
"""

from __future__ import annotations

import pytest
from far.api.v1 import access_pb2
from google.protobuf import descriptor_pb2

from devstack import catalog
from servers.common.access import (
    ROLE_NAMES,
    AccessDeclarationError,
    AccessRule,
    access_problems,
    access_rules,
    rule_from,
)
from servers.common.auth import ANONYMOUS, Principal, Role
from servers.common.errors import PermissionDenied, Unauthenticated

Access = access_pb2.Access


def far_methods() -> list[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    """(`/package.Service/Method`, method) for every method of every far.* service in the descriptor set."""
    return [
        (f"/{file.package}.{service.name}/{method.name}", method)
        for file in catalog.load_descriptor_set().file
        if file.package.startswith("far.")
        for service in file.service
        for method in service.method
    ]


class TestDeclarations:
    def test_every_method_declares_its_access(self) -> None:
        methods = far_methods()
        assert len(methods) > 100, "the descriptor set lost its services"
        undeclared = [path for path, method in methods if not method.options.HasExtension(access_pb2.access)]
        assert undeclared == [], "methods without (far.api.v1.access): " + ", ".join(undeclared)

    def test_every_declaration_is_well_formed(self) -> None:
        problems = [
            f"{path}: {problem}"
            for path, method in far_methods()
            for problem in access_problems(method.options.Extensions[access_pb2.access])
        ]
        assert problems == []

    def test_role_names_are_role_values(self) -> None:
        named = {role for _, method in far_methods() for role in method.options.Extensions[access_pb2.access].roles}
        assert named <= ROLE_NAMES
        assert {role.value for role in Role} == ROLE_NAMES

    def test_every_level_is_used(self) -> None:
        levels = {method.options.Extensions[access_pb2.access].level for _, method in far_methods()}
        assert levels == {
            Access.LEVEL_PUBLIC,
            Access.LEVEL_AUTHENTICATED,
            Access.LEVEL_ROLES,
            Access.LEVEL_PARTNER,
            Access.LEVEL_INTERNAL,
        }

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/far.gamed.v1.GamedService/GetGame", {"level": "public"}),
            ("/far.gamed.v1.GamedService/CreateGame", {"level": "roles", "roles": ["publisher"]}),
            ("/far.gamed.v1.GamedService/UpdateGame", {"level": "authenticated"}),
            ("/far.auth.v1.AuthService/SignIn", {"level": "public"}),
            ("/far.auth.v1.AuthService/ListSessions", {"level": "authenticated"}),
            ("/far.auth.v1.AuthService/GrantRole", {"level": "roles", "roles": ["admin"]}),
            (
                "/far.gaming.v1.GamingService/SubmitScore",
                {"level": "partner", "roles": ["admin"], "partners": ["game-server"]},
            ),
            ("/far.realtime.v1.RealtimeService/Publish", {"level": "internal"}),
            ("/far.desci.v1.DesciService/CreateReview", {"level": "roles", "roles": ["reviewer"]}),
        ],
    )
    def test_declarations_follow_the_method_comments(self, path: str, expected: dict[str, object]) -> None:
        (method,) = [m for p, m in far_methods() if p == path]
        assert rule_from(method.options.Extensions[access_pb2.access]).as_json() == expected

    def test_the_python_stubs_carry_the_option_too(self) -> None:
        from far.gamed.v1 import gamed_service_pb2

        service = gamed_service_pb2.DESCRIPTOR.services_by_name["GamedService"]
        rules = access_rules([service.full_name])
        assert rules[f"/{service.full_name}/CreateGame"] == AccessRule(Access.LEVEL_ROLES, frozenset({"publisher"}))
        assert len(rules) == len(service.methods)


class TestAccessProblems:
    @pytest.mark.parametrize(
        ("access", "problem"),
        [
            (Access(), "LEVEL_UNSPECIFIED"),
            (Access(level=Access.LEVEL_ROLES), "without roles"),
            (Access(level=Access.LEVEL_ROLES, roles=["owner"]), "unknown role 'owner'"),
            (Access(level=Access.LEVEL_ROLES, roles=["admin", "admin"]), "twice"),
            (Access(level=Access.LEVEL_PUBLIC, roles=["user"]), "roles with LEVEL_PUBLIC"),
            (Access(level=Access.LEVEL_AUTHENTICATED, roles=["user"]), "roles with LEVEL_AUTHENTICATED"),
            (Access(level=Access.LEVEL_PARTNER), "partners are required"),
            (Access(level=Access.LEVEL_ROLES, roles=["admin"], partners=["x"]), "partners are required"),
            (Access(level=Access.LEVEL_PUBLIC, services=["gaming"]), "services only"),
        ],
    )
    def test_malformed(self, access: access_pb2.Access, problem: str) -> None:
        assert any(problem in found for found in access_problems(access)), access_problems(access)

    def test_an_unknown_service_is_refused_at_start(self) -> None:
        with pytest.raises(AccessDeclarationError, match=r"far\.nope\.v1\.NopeService: no compiled contract"):
            access_rules(["far.nope.v1.NopeService"])


def principal(*roles: str) -> Principal:
    return Principal(subject="0x" + "ab" * 20, roles=frozenset(roles))


class TestRuleCheck:
    def test_public_admits_anyone(self) -> None:
        AccessRule(Access.LEVEL_PUBLIC).check(ANONYMOUS)

    def test_authenticated_needs_a_principal(self) -> None:
        rule = AccessRule(Access.LEVEL_AUTHENTICATED)
        with pytest.raises(Unauthenticated):
            rule.check(ANONYMOUS)
        rule.check(principal("user"))

    def test_roles_admit_the_roles_and_admin(self) -> None:
        rule = AccessRule(Access.LEVEL_ROLES, frozenset({Role.PUBLISHER.value}))
        with pytest.raises(Unauthenticated):
            rule.check(ANONYMOUS)
        with pytest.raises(PermissionDenied, match="publisher") as denied:
            rule.check(principal("user", "organizer"))
        assert denied.value.reason == "MISSING_ROLE"
        rule.check(principal("user", "publisher"))
        rule.check(principal("admin"))

    @pytest.mark.parametrize("level", [Access.LEVEL_PARTNER, Access.LEVEL_INTERNAL])
    def test_partner_and_internal_refuse_every_account_until_mtls(self, level: Access.Level.ValueType) -> None:
        rule = AccessRule(level, partners=("game-server",) if level == Access.LEVEL_PARTNER else ())
        for caller in (ANONYMOUS, principal("user"), principal("admin", "operator")):
            with pytest.raises(PermissionDenied) as denied:
                rule.check(caller)
            assert denied.value.reason == "PARTNER_ONLY"

    def test_partner_methods_admit_their_listed_roles(self) -> None:
        rule = AccessRule(Access.LEVEL_PARTNER, frozenset({"admin"}), partners=("game-server",))
        rule.check(principal("admin"))
        with pytest.raises(PermissionDenied):
            rule.check(principal("organizer"))

    def test_undeclared_is_refused(self) -> None:
        with pytest.raises(PermissionDenied) as denied:
            AccessRule(Access.LEVEL_UNSPECIFIED).check(principal("admin"))
        assert denied.value.reason == "ACCESS_NOT_DECLARED"
