from __future__ import annotations

import pytest

from devstack.__main__ import main
from servers.common.auth import JwtKeys, TokenVerifier

SECRET = "dev-token-test-secret-0123456789abcdef"


class TestTokenCommand:
    def test_prints_a_token_the_servers_accept(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("JWT_SECRET", SECRET)
        wallet = "0x00000000000000000000000000000000000000Ab"
        assert main(["token", "--wallet", wallet, "--role", "publisher", "--ttl", "60"]) == 0
        principal = TokenVerifier(JwtKeys("k1", {"k1": SECRET})).verify(capsys.readouterr().out.strip())
        assert principal.subject == wallet.lower()
        assert principal.roles == {"publisher"}

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--wallet", "0x123"], "is not a 0x-prefixed 20-byte address"),
            (["--wallet", "0x" + "1" * 40, "--role", "emperor"], "unknown role(s) emperor"),
        ],
    )
    def test_rejects_bad_input(self, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str) -> None:
        monkeypatch.setenv("JWT_SECRET", SECRET)
        with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
            main(["token", *argv])
