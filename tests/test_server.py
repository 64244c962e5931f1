"""The app served for real: gunicorn with several workers (and `python app.py`) on a fresh database."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """One HTTP request on a new connection (so successive calls can land on different workers)."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    request.add_header("Connection", "close")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    """A server process on a free port, its log in a file, stopped at the end of the test."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [part.format(port=self.port) for part in command]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env | {"PORT": str(self.port)}, stdout=out, stderr=subprocess.STDOUT
            )
        self.wait_until_healthy()

    def wait_until_healthy(self, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if call("GET", f"{self.url}/api/health")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server not healthy after {timeout}s:\n{self.log.read_text()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def environment(fresh_database_url, tmp_path) -> dict:
    """A development environment as a new machine has it: no secrets, no admin settings."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "APP_ENV": "development",
        "DATABASE_URL": fresh_database_url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def start(tmp_path):
    servers = []

    def start_server(command: list[str], env: dict) -> Server:
        server = Server(command, env, tmp_path / "server.log")
        servers.append(server)
        return server

    yield start_server
    for server in servers:
        server.stop()


GUNICORN = [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--bind", "127.0.0.1:{port}",
            "--no-control-socket", "app:app"]  # fmt: skip


def test_workers_starting_together_migrate_and_create_one_admin(start, environment, fresh_database_url, tmp_path):
    server = start(GUNICORN, environment)

    status, body = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})

    assert status == 200, body
    engine = sa.create_engine(fresh_database_url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT username FROM app_users")).scalars().all() == ["admin"]
    engine.dispose()
    secrets = sorted(path.name for path in (tmp_path / "instance").iterdir() if not path.name.startswith("."))
    assert secrets == ["jwt_secret_key", "secret_key"]
    server.stop()
    assert "Traceback" not in server.log.read_text()
    assert server.log.read_text().count("Created the default administrator") == 1


def test_parallel_registrations_of_one_name_give_one_201_and_seven_409(start, environment):
    server = start(GUNICORN, environment)
    barrier = threading.Barrier(8)
    results = []

    def register(n: int):
        body = {"username": "racer", "email": f"racer{n}@example.com", "password": "fast-and-furious", "full_name": "R"}
        barrier.wait()
        results.append(call("POST", f"{server.url}/api/auth/register", body))

    threads = [threading.Thread(target=register, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(status for status, _ in results) == [201] + [409] * 7, results
    for status, body in results:
        if status == 409:
            assert body["details"] == {"username": ["This username is already taken."]}
    server.stop()
    assert "Traceback" not in server.log.read_text()


def test_a_token_works_on_every_worker_and_after_a_restart(start, environment):
    server = start(GUNICORN, environment)
    token = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1][
        "access_token"
    ]

    assert {call("GET", f"{server.url}/api/auth/me", token=token)[0] for _ in range(4 * WORKERS)} == {200}

    server.stop()
    restarted = start(GUNICORN, environment)

    assert call("GET", f"{restarted.url}/api/auth/me", token=token)[0] == 200


def test_python_app_py_serves_the_api(start, environment):
    server = start([sys.executable, "app.py"], environment)

    status, body = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})

    assert status == 200, body
    assert call("GET", f"{server.url}/api/tasks", token=body["access_token"])[0] == 200
