"""The platform as `make run` starts it: real server processes behind a real Envoy.

`stack` (session-scoped) runs the migrations of SERVICES the way `make run` does, starts
`python -m servers.<service>` for each on a free port (mTLS only, certificates from the stack's dev CA) and
Envoy on free ports in front of them, and stops them all at the end of the run whatever happens.
Logs: `stack.log_dir` (printed when a test fails).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import grpc
import pytest
from eth_account import Account

from devstack.stack import Stack, run_migrations

# gpu and inference run without a chain (no BSC_RPC_URL: paid models stay unpriced, GPU_MIN_OPERATOR_STAKE unset: no
# stake check) and without GPU nodes: their calls answer up to "no node serves the model" (FAILED_PRECONDITION). Paid
# token streaming through Triton is tests/e2e/test_inference_e2e.py's, with a stack of its own.
SERVICES = ["gamed", "auth", "gpu", "inference"]
# A fixed dev key whose wallet is the auth service's bootstrap admin in the stack (AUTH_BOOTSTRAP_ADMINS).
E2E_ADMIN_KEY = "0x" + "e2" * 32


@pytest.fixture(scope="session")
def isolated_env(
    new_database: Callable[[str], str],
    redis_url: str,
    redis_key_prefix: str,
    jwt_secret: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], dict[str, str]]:
    """`isolated_env(name)` -> the environment of a stack's server processes with a database and a Redis key
    prefix of their own (`far_test_<run>_<name>`, `<run prefix><name>:`): the stacks of one run, and the
    in-process servers of other tests, must not take each other's queued jobs or sweep each other's nodes."""

    def make(name: str) -> dict[str, str]:
        return stack_environment(
            new_database(name), redis_url, f"{redis_key_prefix}{name}:", jwt_secret, tmp_path_factory
        )

    return make


@pytest.fixture(scope="session")
def stack_env(isolated_env: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """What every server process of the shared e2e stack gets."""
    return isolated_env("e2e")


def stack_environment(
    database_url: str, redis_url: str, key_prefix: str, jwt_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "JWT_SECRET": jwt_secret,
        "JWT_KEY_ID": "k1",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
        # Tests stop the stack once; no load balancer needs time to notice the drain.
        "DRAIN_DELAY_SECONDS": "0",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "FAR_DATA_DIR": str(tmp_path_factory.mktemp("far-data")),
        "AUTH_BOOTSTRAP_ADMINS": Account.from_key(E2E_ADMIN_KEY).address,
    }


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    run_migrations(SERVICES, stack_env, log_path=run_dir / "logs" / "migrations.log")
    with Stack(SERVICES, env=stack_env, run_dir=run_dir, envoy=True) as running:
        yield running


@pytest.fixture(scope="session")
def envoy_channel(stack: Stack) -> Iterator[grpc.Channel]:
    """A plain gRPC (h2c) channel to Envoy's web listener."""
    with grpc.insecure_channel(stack.envoy_grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def gamed_channel_direct(stack: Stack) -> Iterator[grpc.Channel]:
    """A gRPC channel straight to the gamed server process, bypassing Envoy: mTLS as a FAR service (`e2e`),
    which acts for the account whose token a call carries."""
    with grpc.secure_channel(stack.grpc_target("gamed"), stack.client_credentials("service", "e2e")) as channel:
        yield channel


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    running = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(running, Stack):
        report.sections.append(("stack logs", f"server and Envoy logs are in {running.log_dir}"))
    return report
