"""The app served for real: gunicorn with several workers (and `python app.py`) on a fresh database."""

import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from helpers import GUNICORN, ROOT, WORKERS, call


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


@pytest.fixture
def production_environment(environment) -> dict:
    return environment | {
        "APP_ENV": "production",
        "SECRET_KEY": "production-secret-key-0123456789-0123456789",
        "JWT_SECRET_KEY": "production-jwt-secret-key-0123456789-0123456789",
        "ADMIN_USERNAME": "ops",
        "ADMIN_EMAIL": "ops@finstack.com",
        "ADMIN_PASSWORD": "ops-password-1",
    }


def test_production_start_migrates_then_serves_with_the_configured_admin(start, production_environment, tmp_path):
    upgrade = subprocess.run(
        [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=production_environment, capture_output=True
    )
    assert upgrade.returncode == 0, upgrade.stderr.decode()

    server = start(GUNICORN, production_environment)

    assert call("POST", f"{server.url}/api/auth/login", {"username": "ops", "password": "ops-password-1"})[0] == 200
    assert call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[0] == 401
    assert not (tmp_path / "instance").exists()  # production writes nothing beside the code


def test_production_without_secrets_refuses_to_start_with_a_clear_message(production_environment):
    environment = {k: v for k, v in production_environment.items() if k != "JWT_SECRET_KEY"}

    result = subprocess.run(
        [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=environment, capture_output=True, timeout=60
    )

    assert result.returncode != 0
    assert "JWT_SECRET_KEY must be set when APP_ENV=production." in result.stderr.decode()
