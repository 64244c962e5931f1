"""How `make test` treats PostgreSQL: skipped when no server listens, except in CI; never silently otherwise."""

import contextlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from helpers import ROOT, free_port

pytestmark = pytest.mark.slow  # each test runs pytest in a process of its own


def run_suite(database_url: str, ci: bool) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CI"} | {"TEST_DATABASE_URL": database_url}
    if ci:
        environment["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_users.py"]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("ci", "returncode"), [(False, 0), (True, 1)])
def test_postgres_run_without_a_server_is_skipped_except_in_ci(ci, returncode):
    result = run_suite(f"postgresql://postgres@127.0.0.1:{free_port()}/test", ci)

    assert result.returncode == returncode, result.stdout + result.stderr
    assert "No PostgreSQL listening" in result.stdout + result.stderr
    assert "passed" not in result.stdout


@pytest.fixture
def not_postgres():
    """A port where something listens but hangs up, as a server refusing a wrong database or password does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def hang_up():
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_postgres_run_that_cannot_connect_to_a_listening_server_fails(not_postgres):
    result = run_suite(f"postgresql://postgres@127.0.0.1:{not_postgres}/test", ci=False)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the connection" in result.stdout + result.stderr
