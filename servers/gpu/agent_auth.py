"""Node agent tokens as a bearer credential: `fna_...` -> Principal(partner="node-agent", subject="nodes/<id>")."""

from __future__ import annotations

from servers.common.auth import Principal
from servers.common.db import Database
from servers.common.errors import Unauthenticated
from servers.gpu.registration import AGENT_TOKEN_PREFIX
from servers.gpu.registry import Registry

NODE_AGENT = "node-agent"


class AgentTokenAuthenticator:
    """Looks the token's hash up among the nodes' current tokens (one indexed read per stream)."""

    def __init__(self, database: Database, registry: Registry) -> None:
        self._db = database
        self._registry = registry

    def accepts(self, token: str) -> bool:
        return token.startswith(AGENT_TOKEN_PREFIX)

    async def authenticate(self, token: str) -> Principal:
        if len(token) <= 256:
            async with self._db.read() as uow:
                node_id = await self._registry.node_of_token(uow, token)
            if node_id is not None:
                return Principal(subject=f"nodes/{node_id}", partner=NODE_AGENT)
        raise Unauthenticated(
            "the agent token is not valid (revoked by a newer registration or deregistration?)",
            reason="AGENT_TOKEN_INVALID",
        )
