"""The run's watchdog (tests/watchdog.py): a test hung past its limit ends the run with every thread's stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.watchdog import LIMIT_ENV

ROOT = Path(__file__).resolve().parents[2]


def run_pytest(tmp_path: Path, source: str, limit_s: float) -> subprocess.CompletedProcess[str]:
    """pytest on a module of `source` with only the watchdog loaded, pytest-timeout off, its limit `limit_s`."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), LIMIT_ENV: str(limit_s)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.watchdog", "-p", "no:cacheprovider", "--timeout=0", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_hung_test_ends_the_run_with_the_stacks_then_the_cleanups(tmp_path: Path) -> None:
    result = run_pytest(
        tmp_path,
        "import pathlib, time\n"
        "from tests.watchdog import on_hang\n\n"
        "def test_stuck():\n"
        "    on_hang(lambda: 1 / 0)  # a failing cleanup does not stop the others\n"
        "    on_hang(lambda: pathlib.Path('second').write_text('ran'))\n"
        "    time.sleep(30)\n",
        limit_s=1,
    )
    assert result.returncode == 1
    err = result.stderr
    assert "watchdog: test_sample.py::test_stuck still running after 1 s" in err
    assert 'test_sample.py", line 7 in test_stuck' in err
    assert err.index("in test_stuck") < err.index("ZeroDivisionError") < err.index("ending the run")
    assert (tmp_path / "second").read_text() == "ran"


def test_each_test_gets_the_whole_limit(tmp_path: Path) -> None:
    """Three tests of 0.8 s under a 1.5 s limit: the run outlasts the limit, no test does."""
    result = run_pytest(
        tmp_path,
        "import time\n\n" + "".join(f"def test_{n}():\n    time.sleep(0.8)\n\n" for n in range(3)),
        limit_s=1.5,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert "watchdog" not in result.stderr


def test_a_hang_that_holds_the_gil_is_ended_by_the_c_thread(tmp_path: Path) -> None:
    """libc's sleep called through PyDLL keeps the GIL: the watchdog's thread cannot run, faulthandler's can."""
    started = time.monotonic()
    result = run_pytest(
        tmp_path,
        "import ctypes\n\ndef test_holds_the_gil():\n    ctypes.PyDLL(None).sleep(30)\n",
        limit_s=1,
    )
    assert result.returncode == 1
    assert "Timeout (0:00:0" in result.stderr  # faulthandler, at the limit and as long again
    assert 'test_sample.py", line 4 in test_holds_the_gil' in result.stderr
    assert "watchdog:" not in result.stderr
    assert time.monotonic() - started < 20


def test_the_c_thread_still_watches_the_teardown_of_a_failed_test(tmp_path: Path) -> None:
    """pytest's faulthandler plugin cancels faulthandler's timer when a test fails; the watchdog puts it back."""
    started = time.monotonic()
    result = run_pytest(
        tmp_path,
        "import ctypes, pytest\n\n"
        "@pytest.fixture\n"
        "def holds_the_gil_at_teardown():\n"
        "    yield\n"
        "    ctypes.PyDLL(None).sleep(30)\n\n"
        "def test_fails(holds_the_gil_at_teardown):\n"
        "    assert False\n",
        limit_s=1,
    )
    assert result.returncode == 1
    assert "Timeout (0:00:0" in result.stderr
    assert 'test_sample.py", line 6 in holds_the_gil_at_teardown' in result.stderr
    assert time.monotonic() - started < 20
