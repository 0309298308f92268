"""`make run` itself: `python -m devstack up` on a bare setup (embedded PostgreSQL, Redis and chain).

Everything on free ports in a temp run dir; the test sends SIGINT as Ctrl-C does and checks that the
platform answered, stopped cleanly, and left no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from far.gamed.v1 import gamed_service_pb2, gamed_service_pb2_grpc

from devstack import catalog
from devstack.processes import free_port
from servers.common.embedded import pid_alive

pytestmark = pytest.mark.e2e


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = path.read_text() if path.exists() else ""
        if text in output:
            return output
        if proc.poll() is not None:
            pytest.fail(f"devstack up exited with {proc.returncode}:\n{output}")
        time.sleep(0.2)
    pytest.fail(f"devstack up did not print {text!r} in {timeout} s:\n{path.read_text()}")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pids_in(run_dir: Path) -> set[int]:
    """Processes whose command line mentions the run dir (servers, Envoy, embedded infra)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(run_dir).encode() in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def test_make_run_brings_the_platform_up_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "BSC_RPC_URL", "JWT_SECRET")}
    env |= {"DEVSTACK_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    ports = {
        "ENVOY_HTTP_PORT": free_port(),
        "ENVOY_PARTNER_PORT": free_port(),
        "ENVOY_ADMIN_PORT": free_port(),
        "ANVIL_PORT": free_port(),
    }
    for service in catalog.implemented_services():
        ports[f"{service.name.upper()}_GRPC_PORT"] = free_port()
        ports[f"{service.name.upper()}_METRICS_PORT"] = free_port()
    env |= {name: str(port) for name, port in ports.items()}
    log = tmp_path / "devstack.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack", "up"],
            cwd=catalog.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        output = _wait_for(log, "Ctrl-C stops everything", proc, timeout=120)
        assert "SERVING" in output
        assert all(_listening(port) for port in ports.values())
        started = _pids_in(run_dir)
        assert started, "no process runs from the run dir"

        web = f"http://127.0.0.1:{ports['ENVOY_HTTP_PORT']}"
        games = httpx.get(f"{web}/v1/games", timeout=10)
        assert games.status_code == 200
        assert games.json()["games"] == []
        challenge = httpx.post(
            f"{web}/v1/challenges",
            json={
                "walletAddress": "0x" + "ab" * 20,
                "chainId": "97",
                "domain": "localhost:3000",
                "uri": "http://localhost:3000/login",
            },
            timeout=10,
        )
        assert challenge.status_code == 200, challenge.text
        assert "wants you to sign in with your Ethereum account" in challenge.json()["message"]
        assert (run_dir / "chain" / "deployments.json").exists()
        # The dev PKI was made on this first start: keys for the owner only, the partner call printed.
        assert (run_dir / "pki" / "ca.pem").exists()
        assert (run_dir / "pki" / "service-gamed.key").stat().st_mode & 0o777 == 0o600
        assert f"https://127.0.0.1:{ports['ENVOY_PARTNER_PORT']}" in output
        assert "--cert" in output
        assert "partner-game-server.pem" in output
        pki = run_dir / "pki"
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / "partner-game-server.key").read_bytes(),
            (pki / "partner-game-server.pem").read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{ports['ENVOY_PARTNER_PORT']}", creds) as channel:
            listed = gamed_service_pb2_grpc.GamedServiceStub(channel).ListGames(
                gamed_service_pb2.ListGamesRequest(), timeout=10
            )
        assert list(listed.games) == []
        assert (run_dir / "logs" / "gamed.log").exists()
        # The chain event ingester follows the dev chain (its first steps publish the deployment's events).
        assert "ingest: started" in output
        deadline = time.monotonic() + 30
        while "ingesting" not in (run_dir / "logs" / "ingest.log").read_text():
            assert time.monotonic() < deadline, (run_dir / "logs" / "ingest.log").read_text()
            time.sleep(0.2)
        # One local GPU node (tritonserver + agent) registered through the partner listener, and the paid model
        # it serves is on sale through the edge at the price the dev chain set.
        assert "gpu node: nodes/local-gpu-1 registered" in output
        deadline = time.monotonic() + 60
        while True:
            model = httpx.get(f"{web}/v1/models/smollm2-135m-instruct", timeout=10).json()
            if model.get("availability") == "AVAILABILITY_AVAILABLE":
                break
            assert time.monotonic() < deadline, model
            time.sleep(0.3)
        assert model["servingNodeCount"] == 1
        assert model["pricePerToken"]["value"] == "1000000000000"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    assert "stopped" in log.read_text()
    left = {pid for pid in started if pid_alive(pid)}
    assert not left, f"processes left behind: {left}"
    listening = [name for name, port in ports.items() if _listening(port)]
    assert not listening, f"still listening after Ctrl-C: {listening}"
