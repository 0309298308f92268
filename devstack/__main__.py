"""Bring the FAR platform up on one machine, or render Envoy's config.

    python -m devstack up                       (what `make run` does)
    python -m devstack render-envoy --out FILE

`up` uses embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset (data in
.run/data/), keeps a generated JWT_SECRET in .run/jwt_secret, runs the migrations, starts every
implemented server and Envoy on the default ports, prints the endpoints and waits. Ctrl-C or SIGTERM
stops servers, then Envoy, then the embedded PostgreSQL/Redis it started.

With BSC_RPC_URL unset it also starts anvil (chain id 97) on ANVIL_PORT (8545), deploys FARToken,
InferencePayment and Staking, funds dev accounts, writes .run/chain/deployments.json and gives the
services BSC_RPC_URL and FAR_TOKEN_ADDRESS / FAR_INFERENCE_PAYMENT_ADDRESS / FAR_STAKING_ADDRESS; with
BSC_RPC_URL set nothing is deployed and those three addresses must be set (devstack/chain.py).

mTLS: on first start `up` creates a dev CA and certificates in .run/pki/ (devstack/pki.py; reused
afterwards, never committed): each server listens on mTLS only with its own certificate, Envoy reaches
them with its certificate, and Envoy's partner listener (ENVOY_PARTNER_PORT, 8443) takes gRPC from
clients holding a partner certificate (.run/pki/partner-game-server.pem / .key, partner-node-agent).

Port overrides: <SERVICE>_GRPC_PORT, <SERVICE>_METRICS_PORT (e.g. GAMED_GRPC_PORT), ENVOY_HTTP_PORT,
ENVOY_PARTNER_PORT, ENVOY_ADMIN_PORT. DEVSTACK_HOST is where servers listen (127.0.0.1), ENVOY_LISTEN_HOST where
Envoy's web listener does (127.0.0.1; 0.0.0.0 to reach it from other machines), DEVSTACK_SERVICES a
comma-separated subset of services to start, DEVSTACK_RUN_DIR the state directory (.run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from devstack import catalog
from devstack import envoy as envoy_config
from devstack.processes import ManagedProcess, PortInUse, ProcessDied, require_free_ports
from devstack.stack import EndpointRow, Stack, python_env, run_migrations, wait_healthy
from servers.common.embedded import EmbeddedServer, EmbeddedStartError, ensure_redis, start_postgres

# The chain event ingester: a process of its own, without gRPC (servers/ingest).
INGEST = "ingest"

if TYPE_CHECKING:
    from devstack.chain import DevChain
    from devstack.node import LocalNode

DATABASE_NAME = "far"


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def _still_stopping(signum: int, frame: FrameType | None) -> None:
    print("devstack: already stopping; every process gets SIGKILL after 15 s", flush=True)


class Console:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, line: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {line}", flush=True)


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _env_port(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"devstack: {name}={raw!r} is not a port number")
    return int(raw)


def _run_dir() -> Path:
    return Path(os.environ.get("DEVSTACK_RUN_DIR") or catalog.ROOT / ".run").resolve()


def _jwt_secret(run_dir: Path) -> str:
    path = run_dir / "jwt_secret"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
    return path.read_text().strip()


def _selected_services() -> list[catalog.Service]:
    raw = os.environ.get("DEVSTACK_SERVICES", "")
    if not raw:
        return catalog.implemented_services()
    try:
        chosen = [catalog.get(name.strip()) for name in raw.split(",") if name.strip()]
    except KeyError as exc:
        raise SystemExit(f"devstack: DEVSTACK_SERVICES: {exc.args[0]}") from None
    missing = [s.name for s in chosen if not s.implemented]
    if missing:
        raise SystemExit(f"devstack: DEVSTACK_SERVICES names services without a server: {', '.join(missing)}")
    return chosen


def _table(rows: Sequence[EndpointRow], envoy_url: str) -> str:
    header = EndpointRow("service", "gRPC", f"REST paths (via {envoy_url})", "metrics", "health")
    fields: list[Callable[[EndpointRow], str]] = [
        lambda r: r.service,
        lambda r: r.grpc,
        lambda r: r.rest,
        lambda r: r.metrics,
        lambda r: r.health,
    ]
    widths = [max(len(get(r)) for r in [header, *rows]) for get in fields]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(get(row).ljust(w) for get, w in zip(fields, widths, strict=True)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _partner_example(stack: Stack) -> str:
    """How to call the partner listener as the dev game server, with buf curl."""
    assert stack.pki is not None
    files = stack.pki.partner("game-server")
    return (
        "  node_modules/.bin/buf curl --protocol grpc --schema generated/descriptors/far.binpb \\\n"
        f"    --cacert {_rel(stack.pki.ca_file)} --cert {_rel(files.cert)} --key {_rel(files.key)} \\\n"
        f"    https://{stack.envoy_partner_target}/far.gamed.v1.GamedService/ListGames -d '{{}}'"
    )


def _start_node(stack: Stack, run_dir: Path, say: Console) -> LocalNode:
    """One local GPU node: tritonserver with the chat model and its agent, registered through Envoy's partner
    listener with the dev `node-agent` certificate (the gpu server itself takes only service and edge peers)."""
    from devstack.node import start_local_node
    from gpu.agent.config import TlsFiles

    say("gpu node: starting tritonserver (SmolLM2 on llama.cpp) and the node agent ...")
    tls = None
    if stack.pki is not None:
        files = stack.pki.ensure_identity("partner", "node-agent")
        tls = TlsFiles(ca=stack.pki.ca_file, cert=files.cert, key=files.key)
    target = stack.envoy_partner_target if stack.pki is not None else stack.grpc_target("gpu")
    node = start_local_node(
        run_dir, gpu_service=target, tls=tls, triton_trace_url=os.environ.get("AGENT_TRITON_TRACE_URL") or None
    )
    say(f"gpu node: {node.name} registered (tritonserver pid {node.triton.pid}, agent pid {node.agent.pid})")
    return node


def cmd_up(args: argparse.Namespace) -> int:
    say = Console()
    run_dir = _run_dir()
    data_dir, log_dir = run_dir / "data", run_dir / "logs"
    host = os.environ.get("DEVSTACK_HOST", "127.0.0.1")
    envoy_host = os.environ.get("ENVOY_LISTEN_HOST", "127.0.0.1")
    services = _selected_services()
    grpc_ports = {s.name: _env_port(f"{s.name.upper()}_GRPC_PORT", s.grpc_port) for s in services}
    metrics_ports = {s.name: _env_port(f"{s.name.upper()}_METRICS_PORT", s.metrics_port) for s in services}
    web_port = _env_port("ENVOY_HTTP_PORT", catalog.ENVOY_WEB_PORT)
    admin_port = _env_port("ENVOY_ADMIN_PORT", catalog.ENVOY_ADMIN_PORT)
    partner_port = _env_port("ENVOY_PARTNER_PORT", catalog.ENVOY_PARTNER_PORT)

    embedded: list[EmbeddedServer] = []
    stack: Stack | None = None
    dev_chain: DevChain | None = None
    ingester: ManagedProcess | None = None
    node: LocalNode | None = None
    status = 0
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        # Everything that can be checked before anything starts is checked first.
        fixed = {f"{name} gRPC, {name.upper()}_GRPC_PORT": port for name, port in grpc_ports.items()}
        fixed |= {f"{name} metrics, {name.upper()}_METRICS_PORT": port for name, port in metrics_ports.items()}
        require_free_ports(host, fixed)
        require_free_ports(
            envoy_host,
            {
                "Envoy web listener, ENVOY_HTTP_PORT": web_port,
                "Envoy partner listener, ENVOY_PARTNER_PORT": partner_port,
            },
        )
        require_free_ports(envoy_config.ADMIN_HOST, {"Envoy admin, ENVOY_ADMIN_PORT": admin_port})
        fds = catalog.load_descriptor_set()
        catalog.check_descriptor(fds, require=services)
        run_dir.mkdir(parents=True, exist_ok=True)
        say(f"devstack: state in {_rel(run_dir)}/, logs in {_rel(log_dir)}/")
        if not services:
            say("services: none implemented yet; Envoy answers UNIMPLEMENTED for every service")

        env: dict[str, str] = {}
        if not os.environ.get("FAR_DATA_DIR"):
            env["FAR_DATA_DIR"] = str(data_dir)
        if os.environ.get("DATABASE_URL"):
            say("postgres: using DATABASE_URL")
        else:
            say(f"postgres: starting embedded PostgreSQL 16 in {_rel(data_dir / 'postgres')} ...")
            pg = start_postgres(data_dir / "postgres", database=DATABASE_NAME)
            if pg.started:
                embedded.append(pg)
            say(f"postgres: {'ready' if pg.started else 'reusing a running one'} (pid {pg.pid}) {pg.url}")
            env["DATABASE_URL"] = pg.url
        if os.environ.get("REDIS_URL"):
            say("redis: using REDIS_URL")
        else:
            say(f"redis: starting embedded Redis in {_rel(data_dir / 'redis')} ...")
            redis = ensure_redis(data_dir / "redis")
            if redis.started:
                embedded.append(redis)
            say(f"redis: {'ready' if redis.started else 'reusing a running one'} (pid {redis.pid}) {redis.url}")
            env["REDIS_URL"] = redis.url
        if not os.environ.get("JWT_SECRET"):
            env["JWT_SECRET"] = _jwt_secret(run_dir)
            say(f"auth: JWT_SECRET from {_rel(run_dir / 'jwt_secret')}")

        # The chain (BSC_RPC_URL and the contract addresses): anvil with the contracts when unset.
        from devstack.chain import devstack_chain  # imports web3 (a second); only `up` needs it

        chain_env, dev_chain = devstack_chain(os.environ, run_dir, log_dir, say)
        env.update(chain_env)

        names = [s.name for s in services]
        migrated = [*names, INGEST]
        say(f"migrations: upgrading {', '.join(migrated)} ...")
        run_migrations(migrated, env, log_path=log_dir / "migrations.log")
        say(f"migrations: done (log {_rel(log_dir / 'migrations.log')})")

        stack = Stack(
            names,
            env=env,
            run_dir=run_dir,
            host=host,
            grpc_ports=grpc_ports,
            metrics_ports=metrics_ports,
            envoy_web_port=web_port,
            envoy_admin_port=admin_port,
            envoy_partner_port=partner_port,
            envoy_listen_host=envoy_host,
            envoy_concurrency=min(4, os.cpu_count() or 1),
            progress=say,
        )
        stack.start()
        health = wait_healthy(stack)
        ingester = ManagedProcess(
            INGEST,
            [sys.executable, "-m", f"servers.{INGEST}"],
            log_path=log_dir / f"{INGEST}.log",
            env=python_env({**os.environ, **env}),
            cwd=catalog.ROOT,
        ).start()
        say(f"{INGEST}: started (pid {ingester.pid}), following the contracts' events, log {_rel(ingester.log_path)}")
        if "gpu" in names and os.environ.get("DEVSTACK_GPU_NODE", "1") != "0":
            node = _start_node(stack, run_dir, say)
        say("all up")
        print()
        print(_table(stack.endpoint_rows(health), stack.envoy_http_url))
        print()
        print(f"Envoy web    {stack.envoy_http_url}  (JSON, gRPC-Web, gRPC over h2c; unknown services: UNIMPLEMENTED)")
        print(f"Envoy mTLS   https://{stack.envoy_partner_target}  (partners: gRPC with a client certificate)")
        print(f"Envoy admin  {stack.envoy_admin_url}  (loopback only)")
        if stack.pki is not None:
            print(f"certificates {_rel(stack.pki.directory)}/  (dev CA, one per service, Envoy and dev partner)")
            print(_partner_example(stack))
        print(f"config       {_rel(stack.envoy_config_path)}")
        print(f"logs         {_rel(stack.log_dir)}/  ({', '.join(p.name for p in stack.iter_log_files())})")
        for name in ("DATABASE_URL", "REDIS_URL", "BSC_RPC_URL"):
            print(f"{name:<12} {env.get(name) or os.environ.get(name, '')}")
        if dev_chain is not None:
            print(f"chain        {_rel(dev_chain.deployments_file)}  (chain id 97, dev accounts funded with FAR)")
        print("\nCtrl-C stops everything.", flush=True)
        while True:
            stack.check_alive()
            ingester.check()
            time.sleep(0.5)
    except _Interrupted as exc:
        print(flush=True)
        say(f"{exc.args[0]}: stopping")
    except (ProcessDied, PortInUse, EmbeddedStartError, TimeoutError, RuntimeError, ValueError) as exc:
        first, _, rest = str(exc).partition("\n")
        print(f"devstack: {first}", file=sys.stderr, flush=True)
        if rest:
            print("\n".join(f"    {line}" for line in rest.splitlines()), file=sys.stderr, flush=True)
        status = 1
    finally:
        signal.signal(signal.SIGINT, _still_stopping)
        signal.signal(signal.SIGTERM, _still_stopping)
        if node is not None:
            node.stop()
            say(f"{node.name}: agent and tritonserver stopped")
        if ingester is not None:
            ingester.stop()
            say(f"{INGEST}: stopped")
        if stack is not None:
            stack.stop()
            say("servers and Envoy stopped")
        if dev_chain is not None:
            dev_chain.stop()
            say(f"anvil: stopped (pid {dev_chain.anvil.pid})")
        for server in reversed(embedded):
            server.stop()
            say(f"{server.name}: stopped (pid {server.pid})")
    return status


def cmd_render_envoy(args: argparse.Namespace) -> int:
    upstreams: dict[str, str] = {}
    for item in args.upstream or []:
        name, sep, address = item.partition("=")
        if not sep:
            raise SystemExit(f"devstack: --upstream wants NAME=HOST:PORT, got {item!r}")
        upstreams[name] = address
    if not args.upstream:
        upstreams = {s.name: f"127.0.0.1:{s.grpc_port}" for s in catalog.implemented_services()}
    try:
        tls = envoy_config.EdgeTls.from_env(os.environ)
    except ValueError as exc:
        raise SystemExit(f"devstack: {exc}") from None
    options = envoy_config.EdgeOptions(
        web_port=args.web_port,
        admin_port=args.admin_port,
        listen_host=args.listen_host,
        access_log_path=args.access_log,
        proto_descriptor_path=args.descriptor_path_in_config,
        tls=tls,
        partner_port=args.partner_port if tls is not None else None,
        jwt=envoy_config.JwtSettings.from_env(os.environ),
        **envoy_config.EdgeOptions.edge_settings_from_env(os.environ),
    )
    if options.jwt is None:
        print("no JWT_SECRET in the environment: the config has no jwt_authn (the services still verify tokens)")
    if tls is None:
        print("no EDGE_TLS_* files in the environment: plaintext upstreams and no partner listener")
    try:
        config = envoy_config.render(catalog.SERVICES, args.descriptor, upstreams, options)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"devstack: {exc}") from None
    envoy_config.write(config, args.out)
    routed = ", ".join(sorted(upstreams)) or "none"
    print(f"wrote {args.out} (routed: {routed}; every other service answers UNIMPLEMENTED)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print an access token signed with the dev JWT secret (until the auth service issues real ones)."""
    from servers.common.auth import JwtKeys, Role, TokenIssuer
    from servers.common.validation import WALLET_ADDRESS

    wallet = args.wallet.lower()
    if not WALLET_ADDRESS.match(wallet):
        raise SystemExit(f"devstack: --wallet {args.wallet!r} is not a 0x-prefixed 20-byte address")
    known = {role.value for role in Role}
    unknown = sorted(set(args.role) - known)
    if unknown:
        raise SystemExit(f"devstack: unknown role(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    secret = os.environ.get("JWT_SECRET") or _jwt_secret(_run_dir())
    keys = JwtKeys(current_kid=os.environ.get("JWT_KEY_ID", "k1"), secrets={os.environ.get("JWT_KEY_ID", "k1"): secret})
    print(TokenIssuer(keys).issue(wallet, args.role or ["user"], ttl_s=args.ttl))
    return 0


def cmd_pay(args: argparse.Namespace) -> int:
    """Pay an inference quote on the dev chain from a wallet key: approve the price, then InferencePayment.pay.

    Prints the transaction hash (what Generate / CreateJob take as `payment.transaction.tx_hash`).
    """
    import json

    from eth_account import Account
    from web3 import Web3

    from devstack.chain import contract_at, job_key, model_key, transact

    quote = json.loads(Path(args.quote).read_text())
    deployments = json.loads((_run_dir() / "chain" / "deployments.json").read_text())
    w3 = Web3(Web3.HTTPProvider(deployments["rpcUrl"]))
    payer = Account.from_key(args.key)
    if quote.get("owner") and quote["owner"] != payer.address.lower():
        raise SystemExit(f"devstack: the quote is for {quote['owner']}, not for the key's wallet {payer.address}")
    token = contract_at(w3, "FARToken", deployments["contracts"]["FARToken"]["address"])
    payment = contract_at(w3, "InferencePayment", quote["paymentContract"])
    tokens = int(quote["maxTokens"]) + int(quote["maxPromptTokens"])
    model = model_key(quote["model"].removeprefix("models/"))
    transact(w3, payer, token.functions.approve(payment.address, int(quote["price"]["value"])))
    receipt = transact(w3, payer, payment.functions.pay(job_key(quote["job"].removeprefix("jobs/")), model, tokens))
    print(receipt["transactionHash"].to_0x_hex())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the platform up and wait (Ctrl-C stops it)")
    up.set_defaults(func=cmd_up)
    render = sub.add_parser("render-envoy", help="write Envoy's bootstrap JSON")
    render.add_argument("--out", type=Path, required=True, help="file to write (.json)")
    render.add_argument(
        "--upstream",
        action="append",
        metavar="NAME=HOST:PORT",
        help="route a service to a server (repeatable); default: every implemented service on its default port",
    )
    render.add_argument("--descriptor", type=Path, default=catalog.DESCRIPTOR_SET, help="descriptor set to read")
    render.add_argument(
        "--descriptor-path-in-config",
        default=None,
        metavar="PATH",
        help="where Envoy will find the descriptor set, if not at --descriptor (e.g. inside an image)",
    )
    render.add_argument("--listen-host", default="0.0.0.0")
    render.add_argument("--web-port", type=int, default=catalog.ENVOY_WEB_PORT)
    render.add_argument("--admin-port", type=int, default=catalog.ENVOY_ADMIN_PORT)
    render.add_argument(
        "--partner-port", type=int, default=catalog.ENVOY_PARTNER_PORT, help="partner mTLS listener (needs EDGE_TLS_*)"
    )
    render.add_argument("--access-log", default=None, help="access log file (default: Envoy's stdout)")
    render.set_defaults(func=cmd_render_envoy)
    token = sub.add_parser("token", help="print a dev access token for a wallet (signed with .run/jwt_secret)")
    token.add_argument("--wallet", required=True, help="0x-prefixed wallet address (the token's subject)")
    token.add_argument("--role", action="append", default=[], help="a role to grant (repeatable); default: user")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds the token is valid (default 3600)")
    token.set_defaults(func=cmd_token)
    pay = sub.add_parser("pay", help="pay an inference quote (JSON from POST /v1/quotes) on the dev chain")
    pay.add_argument("--quote", required=True, help="the quote as JSON (a file)")
    pay.add_argument("--key", required=True, help="the paying wallet's private key (0x hex; a dev account's)")
    pay.set_defaults(func=cmd_pay)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
