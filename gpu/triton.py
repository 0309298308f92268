"""Find and start `tritonserver`: the binary from the nvidia-pytriton wheel here, the Triton container's on GPU nodes.

The wheel's server runs CPU-only on a bare machine once three things are arranged (shared/NOTES.md):
its backends folder copied somewhere writable with the Python backend stub for the models' Python put
into it, `PATH` starting with that Python's bin folder (the stub takes the interpreter, and so its
venv's packages, from there), and `LD_LIBRARY_PATH` holding that Python's libpython and the wheel's
bundled libraries. The container needs no copy: its backends already hold a stub.

The models' Python is this interpreter unless FAR_TRITON_PYTHON names another (a node can keep
llama.cpp and numpy<2 in an environment of their own). Models are loaded explicitly
(`--model-control-mode=explicit`), so the node agent decides what runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from devstack.processes import ManagedProcess, free_port, http_get, wait_until

# Where the Triton container (nvcr.io/nvidia/tritonserver:<ver>-py3) keeps the server and its backends.
CONTAINER_HOME = Path("/opt/tritonserver")
# This repository's models (Triton layout), and the chat model in it.
MODEL_REPOSITORY = Path(__file__).resolve().parent / "models"
CHAT_MODEL = "smollm2-135m-instruct"
STUB_NAME = "triton_python_backend_stub"
# Where the Python backend keeps its shared memory (POSIX shm on Linux).
SHM_DIR = Path("/dev/shm")  # noqa: S108 - where Triton puts it, not a temp file of ours
SHM_PREFIX = "triton_python_backend_shm_region_"
PYTHON_VARIABLE = "FAR_TRITON_PYTHON"

_PYTHON_FACTS = """
import json, sys, sysconfig
from importlib import metadata
try:
    numpy = metadata.version("numpy")
except metadata.PackageNotFoundError:
    numpy = None
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR"),
                  "numpy": numpy}))
"""


class TritonUnavailable(RuntimeError):
    """No usable tritonserver: none installed where this module looks, or the models' Python cannot run under it."""


@dataclass(frozen=True)
class ModelPython:
    """The interpreter whose environment the Python backend stub runs the models in."""

    executable: Path
    version: str
    libdir: Path
    numpy: str | None

    @classmethod
    def probe(cls, executable: Path) -> ModelPython:
        try:
            out = subprocess.run(
                [str(executable), "-c", _PYTHON_FACTS], capture_output=True, text=True, check=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise TritonUnavailable(f"cannot run the models' Python {executable}: {exc}") from None
        facts = json.loads(out)
        return cls(executable, facts["version"], Path(facts["libdir"]), facts["numpy"])


@dataclass(frozen=True)
class TritonInstall:
    """Everything needed to run one tritonserver installation."""

    binary: Path
    # The backends folder as installed (read-only in the wheel's case).
    backends: Path
    # The Python backend stub to put into a copy of `backends`; None when `backends` already holds it.
    stub: Path | None
    # Prepended to LD_LIBRARY_PATH.
    lib_dirs: tuple[Path, ...]
    # Prepended to PATH: the stub runs the first `python3` it finds there.
    bin_dirs: tuple[Path, ...]

    def backend_directory(self, workdir: Path) -> Path:
        """The `--backend-directory` to use: the installed one, or a writable copy holding the stub."""
        if self.stub is None:
            return self.backends
        target = workdir / "backends"
        shutil.copytree(self.backends, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.stub, target / "python" / STUB_NAME)
        return target

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with PATH and LD_LIBRARY_PATH extended for this installation."""
        env = dict(base)
        for name, dirs in (("PATH", self.bin_dirs), ("LD_LIBRARY_PATH", self.lib_dirs)):
            parts = [str(d) for d in dirs] + [p for p in env.get(name, "").split(os.pathsep) if p]
            env[name] = os.pathsep.join(parts)
        return env


def _wheel_install(python: ModelPython) -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    binary = server / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    stub = server / "python_backend_stubs" / python.version / STUB_NAME
    if not stub.is_file():
        raise TritonUnavailable(f"nvidia-pytriton at {package} has no backend stub for Python {python.version}")
    # The wheel's stub was built against numpy 1.x (nvidia-pytriton requires numpy<2): under numpy 2 it
    # reads every input tensor as copies of its first byte and crashes on string inputs.
    if python.numpy is not None and int(python.numpy.split(".")[0]) >= 2:
        raise TritonUnavailable(
            f"the nvidia-pytriton tritonserver needs numpy<2 in the models' Python ({python.executable} has "
            f"numpy {python.numpy}); install numpy<2 there or point {PYTHON_VARIABLE} at a Python that has it"
        )
    return TritonInstall(
        binary=binary,
        backends=server / "backends",
        stub=stub,
        lib_dirs=(python.libdir, package.parent / "nvidia_pytriton.libs"),
        bin_dirs=(python.executable.parent,),
    )


def _container_install(home: Path, python: ModelPython) -> TritonInstall | None:
    binary = home / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    return TritonInstall(
        binary=binary,
        backends=home / "backends",
        stub=None,
        lib_dirs=(home / "lib",),
        bin_dirs=(python.executable.parent,),
    )


def find_tritonserver(python: Path | None = None) -> TritonInstall:
    """The nvidia-pytriton wheel's tritonserver if installed, else the Triton container's, set up to run
    the models in `python`'s environment (default: $FAR_TRITON_PYTHON, else this interpreter).

    Raises TritonUnavailable saying what is missing.
    """
    # Not resolved: a venv's python is a symlink, and the venv is what the stub must find.
    executable = python or Path(os.environ.get(PYTHON_VARIABLE) or sys.executable)
    model_python = ModelPython.probe(executable)
    install = _wheel_install(model_python) or _container_install(CONTAINER_HOME, model_python)
    if install is None:
        raise TritonUnavailable(
            "tritonserver not found: install the nvidia-pytriton wheel (`pip install --no-deps nvidia-pytriton`) "
            f"or run inside the Triton container ({CONTAINER_HOME}/bin/tritonserver)"
        )
    return install


class TritonProcess:
    """A running tritonserver, stopped by PID."""

    def __init__(
        self,
        process: ManagedProcess,
        *,
        host: str,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        exit_timeout_s: int,
    ) -> None:
        self.process = process
        self.exit_timeout_s = exit_timeout_s
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port

    @classmethod
    def start(
        cls,
        model_repository: Path,
        workdir: Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        load_models: Iterable[str] = (),
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        install: TritonInstall | None = None,
        exit_timeout_s: int = 5,
        ready_timeout_s: float = 120.0,
        trace_url: str | None = None,
    ) -> TritonProcess:
        """Start tritonserver on `model_repository` and wait until it and every model in `load_models` are ready.

        Ports left out are picked free. `env` is added to this process's environment (the models read
        their settings from it, e.g. FAR_LLAMA_SLOTS). The server's output goes to `log_path`
        (default `workdir/tritonserver.log`). Raises ProcessDied (with the log's tail) if the server
        exits while starting, e.g. because a model failed to load, and TimeoutError after
        `ready_timeout_s`.

        `trace_url` (`host:port/v1/traces`, an OTLP/HTTP collector) turns on Triton's OpenTelemetry tracing:
        every request is traced (rate 1, timestamps) and continues the W3C `traceparent` it carries, so a
        caller's trace goes on inside Triton (service name `triton`).
        """
        install = install or find_tritonserver()
        # tritonserver runs in `workdir`: relative paths would resolve against it.
        model_repository, workdir = model_repository.resolve(), workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        models = list(load_models)
        http_port = http_port or free_port(host)
        grpc_port = grpc_port or free_port(host)
        metrics_port = metrics_port or free_port(host)
        argv = [
            str(install.binary),
            f"--model-repository={model_repository}",
            f"--backend-directory={install.backend_directory(workdir)}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in models),
            f"--http-address={host}",
            f"--http-port={http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={metrics_port}",
            f"--exit-timeout-secs={exit_timeout_s}",
            "--strict-readiness=true",
        ]
        if trace_url:
            argv += [
                "--trace-config=mode=opentelemetry",
                f"--trace-config=opentelemetry,url={trace_url}",
                "--trace-config=opentelemetry,resource=service.name=triton",
                "--trace-config=rate=1",
                "--trace-config=level=TIMESTAMPS",
            ]
        process = ManagedProcess(
            "tritonserver",
            argv,
            log_path=log_path or workdir / "tritonserver.log",
            env=install.environment({**os.environ, **(env or {})}),
            cwd=workdir,
        ).start()
        triton = cls(
            process,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            exit_timeout_s=exit_timeout_s,
        )
        try:
            wait_until(
                lambda: triton.ready(models),
                timeout=ready_timeout_s,
                what=f"tritonserver on {triton.http_url} to be ready",
                watch=[process],
                interval=0.1,
            )
        except BaseException:
            triton.stop()
            raise
        return triton

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc takes it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port, as tritonclient.http takes it."""
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def ready(self, models: Iterable[str] = ()) -> bool:
        """Whether the server, and each of `models`, answers ready over HTTP."""
        paths = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in models)]
        return all(http_get(f"http://{self.http_url}{path}")[0] == 200 for path in paths)

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (default: Triton's own exit timeout plus a margin).

        A server that had to be killed leaves its Python backend stubs' shared memory in /dev/shm;
        those regions are removed here.
        """
        regions = _stub_shm_regions(self.pid) if self.alive() else set()
        code = self.process.stop(timeout if timeout is not None else self.exit_timeout_s + 10.0)
        for name in regions:
            with contextlib.suppress(FileNotFoundError):
                (SHM_DIR / name).unlink()
        return code


def _stub_shm_regions(server_pid: int) -> set[str]:
    """The shared-memory regions (stub argv[2]) of the Python backend stubs in the server's process group."""
    regions = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if (
                len(argv) > 2
                and Path(argv[0]).name == STUB_NAME
                and argv[2].startswith(SHM_PREFIX)
                and os.getpgid(int(proc.name)) == server_pid
            ):
                regions.add(argv[2])
    return regions
