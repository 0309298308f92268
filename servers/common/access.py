"""Who may call each RPC: the `(far.api.v1.access)` declarations of the contracts (protos/far/api/v1/access.proto).

`access_rules()` reads them from the compiled descriptors once, at server start, and refuses a service with
an undeclared or malformed method; `AccessRule.check()` is what the access interceptor runs on each call.
Ownership and visibility (the caller's own jobs, the game's publisher) stay in the services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from far.api.v1 import access_pb2
from google.protobuf import descriptor, descriptor_pool

from servers.common.auth import Principal, Role, require_signed_in
from servers.common.errors import PermissionDenied

Access = access_pb2.Access
Level: TypeAlias = access_pb2.Access.Level.ValueType

LEVEL_NAMES: Mapping[Level, str] = {
    Access.LEVEL_PUBLIC: "public",
    Access.LEVEL_AUTHENTICATED: "authenticated",
    Access.LEVEL_ROLES: "roles",
    Access.LEVEL_PARTNER: "partner",
    Access.LEVEL_INTERNAL: "internal",
}
ROLE_NAMES = frozenset(role.value for role in Role)


class AccessDeclarationError(Exception):
    """A served method has no `(far.api.v1.access)` declaration, or a malformed one; the message names each."""


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One method's declaration, ready to check: `check()` raises unless the caller may call the method."""

    level: Level
    roles: frozenset[str] = frozenset()
    partners: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    _admitted: frozenset[str] = field(init=False, repr=False, compare=False)
    _denial: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        admitted = self.roles | {Role.ADMIN.value} if self.roles else frozenset()
        object.__setattr__(self, "_admitted", admitted)
        wanted = " or ".join(sorted(admitted))
        denial = {
            Access.LEVEL_ROLES: f"this method needs the {wanted} role",
            Access.LEVEL_PARTNER: f"this method is for partner identities ({', '.join(self.partners)})",
            Access.LEVEL_INTERNAL: "this method is for FAR services only",
        }.get(self.level, "this method declares no access and is not served")
        if self.roles and self.level != Access.LEVEL_ROLES:
            denial += f" and accounts with the {wanted} role"
        object.__setattr__(self, "_denial", denial)

    @property
    def is_public(self) -> bool:
        return self.level == Access.LEVEL_PUBLIC

    def check(self, principal: Principal) -> None:
        """UNAUTHENTICATED or PERMISSION_DENIED (`MISSING_ROLE`, `PARTNER_ONLY`) unless `principal` may call."""
        level = self.level
        if level == Access.LEVEL_PUBLIC:
            return
        if level == Access.LEVEL_AUTHENTICATED:
            require_signed_in(principal)
            return
        if level == Access.LEVEL_ROLES:
            require_signed_in(principal)
            if principal.roles.isdisjoint(self._admitted):
                raise PermissionDenied(self._denial, reason="MISSING_ROLE")
            return
        if level == Access.LEVEL_PARTNER and principal.partner and principal.partner in self.partners:
            return
        if (
            level == Access.LEVEL_INTERNAL
            and principal.service
            and (not self.services or principal.service in self.services)
        ):
            return
        if level in (Access.LEVEL_PARTNER, Access.LEVEL_INTERNAL):
            # Accounts pass only through the roles the declaration lists next to the identities.
            if self._admitted and principal.is_authenticated and not principal.roles.isdisjoint(self._admitted):
                return
            raise PermissionDenied(self._denial, reason="PARTNER_ONLY")
        raise PermissionDenied(self._denial, reason="ACCESS_NOT_DECLARED")

    def as_json(self) -> dict[str, Any]:
        """The declaration as plain JSON (`{"level": "roles", "roles": ["publisher"]}`), for Envoy and docs."""
        out: dict[str, Any] = {"level": LEVEL_NAMES.get(self.level, "undeclared")}
        for key, values in (("roles", sorted(self.roles)), ("partners", self.partners), ("services", self.services)):
            if values:
                out[key] = list(values)
        return out


UNDECLARED = AccessRule(Access.LEVEL_UNSPECIFIED)
"""What a method outside the declared services gets: refused (PERMISSION_DENIED, `ACCESS_NOT_DECLARED`)."""


def access_problems(access: access_pb2.Access) -> list[str]:
    """What is wrong with a declaration (empty when it is well-formed); see access.proto for the rules."""
    level = access.level
    if level not in LEVEL_NAMES:
        return ["no access level (LEVEL_UNSPECIFIED)"]
    problems = [f"unknown role {role!r}" for role in access.roles if role not in ROLE_NAMES]
    if len(set(access.roles)) != len(access.roles):
        problems.append("a role is listed twice")
    if level == Access.LEVEL_ROLES and not access.roles:
        problems.append("LEVEL_ROLES without roles")
    if level in (Access.LEVEL_PUBLIC, Access.LEVEL_AUTHENTICATED) and access.roles:
        problems.append(f"roles with {Access.Level.Name(level)}")
    if (level == Access.LEVEL_PARTNER) != bool(access.partners):
        problems.append("partners are required with LEVEL_PARTNER and only there")
    if access.services and level != Access.LEVEL_INTERNAL:
        problems.append("services only go with LEVEL_INTERNAL")
    return problems


def rule_of(method: descriptor.MethodDescriptor) -> AccessRule:
    """The method's declaration as an AccessRule; AccessDeclarationError when it is missing or malformed."""
    options = method.GetOptions()
    if not options.HasExtension(access_pb2.access):
        raise AccessDeclarationError(f"{method.full_name}: no (far.api.v1.access) option")
    access = options.Extensions[access_pb2.access]
    problems = access_problems(access)
    if problems:
        raise AccessDeclarationError(f"{method.full_name}: {'; '.join(problems)}")
    return rule_from(access)


def rule_from(access: access_pb2.Access) -> AccessRule:
    """An AccessRule from a declaration (not checked: see `access_problems`)."""
    return AccessRule(
        level=access.level,
        roles=frozenset(access.roles),
        partners=tuple(access.partners),
        services=tuple(access.services),
    )


def access_rules(
    service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
) -> dict[str, AccessRule]:
    """`/package.Service/Method` -> AccessRule for every method of the services, from the compiled contracts.

    Raises AccessDeclarationError naming every service that is not in the pool (its `_pb2` module was
    not imported) and every method without a well-formed declaration: a server must not serve them.
    """
    pool = pool or descriptor_pool.Default()
    rules: dict[str, AccessRule] = {}
    problems: list[str] = []
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            problems.append(f"{name}: no compiled contract in the descriptor pool (import its _pb2 module)")
            continue
        for method in service.methods:
            try:
                rules[f"/{name}/{method.name}"] = rule_of(method)
            except AccessDeclarationError as error:
                problems.append(str(error))
    if problems:
        raise AccessDeclarationError("methods without a valid access declaration: " + ", ".join(problems))
    return rules
