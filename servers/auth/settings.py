"""The auth service's own settings (environment variables `AUTH_*`), read with servers.common.config.Env."""

from __future__ import annotations

import re
from dataclasses import dataclass

from servers.common.config import ConfigError, Env
from servers.common.validation import WALLET_ADDRESS

# An RFC 3986 authority as a browser sends it in an origin: host name or IPv4, and a port when not the default.
DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::[0-9]{1,5})?\Z")


@dataclass(frozen=True)
class AuthSettings:
    """Sign-in domains and chains, token lifetimes, the challenge rate limit and the bootstrap admins."""

    domains: frozenset[str]
    chain_ids: frozenset[int]
    access_ttl_s: int
    refresh_ttl_s: int
    nonce_ttl_s: int
    challenges_per_minute: int
    bootstrap_admins: frozenset[str]

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        domains = _items(env, "AUTH_SIWE_DOMAINS", "localhost:3000,localhost:8080")
        for domain in domains:
            if not DOMAIN.match(domain.lower()):
                raise ConfigError(f"AUTH_SIWE_DOMAINS: {domain!r} is not a host or host:port")
        chain_ids: set[int] = set()
        for item in _items(env, "AUTH_CHAIN_IDS", "97"):
            if not item.isdigit() or not 0 < int(item) < 2**63:
                raise ConfigError(f"AUTH_CHAIN_IDS: {item!r} is not an EIP-155 chain id")
            chain_ids.add(int(item))
        admins = [item.lower() for item in _items(env, "AUTH_BOOTSTRAP_ADMINS", "")]
        for admin in admins:
            if not WALLET_ADDRESS.match(admin):
                raise ConfigError(f"AUTH_BOOTSTRAP_ADMINS: {admin!r} is not a 0x-prefixed 20-byte address")
        return cls(
            domains=frozenset(domain.lower() for domain in domains),
            chain_ids=frozenset(chain_ids),
            access_ttl_s=env.integer("AUTH_ACCESS_TTL_SECONDS", 900, minimum=30, maximum=86_400),
            refresh_ttl_s=env.integer("AUTH_REFRESH_TTL_SECONDS", 30 * 86_400, minimum=60, maximum=365 * 86_400),
            nonce_ttl_s=env.integer("AUTH_NONCE_TTL_SECONDS", 300, minimum=10, maximum=3600),
            challenges_per_minute=env.integer("AUTH_CHALLENGES_PER_MINUTE", 20, minimum=1, maximum=10_000),
            bootstrap_admins=frozenset(admins),
        )


def _items(env: Env, name: str, default: str) -> list[str]:
    items = [item.strip() for item in (env.text(name, default) or default).split(",") if item.strip()]
    if not items and default:
        raise ConfigError(f"{name} lists nothing")
    return items
