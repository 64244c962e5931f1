"""The app served for real: gunicorn with several workers (and `python app.py`) on a fresh database."""

import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import sqlalchemy as sa

from helpers import DEV_SERVER, GUNICORN, PRODUCTION, REDIS_URL, ROOT, WORKERS, call, gunicorn, wrong_passwords_at_once


def test_workers_starting_together_migrate_and_create_one_admin(servers, environment, fresh_database_url, tmp_path):
    server = servers.start(GUNICORN, environment)

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


def test_parallel_registrations_of_one_name_give_one_201_and_seven_409(servers, environment):
    server = servers.start(GUNICORN, environment)
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


def test_a_token_works_on_every_worker_and_after_a_restart(servers, environment):
    access_log = ["--access-logfile", "-", "--access-logformat", "worker=%(p)s %(U)s %(s)s"]
    server = servers.start(gunicorn(*access_log), environment)
    token = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1][
        "access_token"
    ]

    def me(_):
        return call("GET", f"{server.url}/api/auth/me", token=token)[0]

    # Workers finish starting one after another; send rounds of parallel requests until several have answered.
    deadline = time.monotonic() + 30
    workers = set()
    while len(workers) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(max_workers=4 * WORKERS) as pool:
            assert set(pool.map(me, range(4 * WORKERS))) == {200}
        workers = set(re.findall(r"worker=<(\d+)> /api/auth/me 200", server.log.read_text()))
    assert len(workers) >= 2, server.log.read_text()  # the same token accepted by different processes

    server.stop()
    restarted = servers.start(GUNICORN, environment)

    assert call("GET", f"{restarted.url}/api/auth/me", token=token)[0] == 200


def test_python_app_py_serves_the_api(servers, environment):
    server = servers.start(DEV_SERVER, environment)

    status, body = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})

    assert status == 200, body
    assert call("GET", f"{server.url}/api/tasks", token=body["access_token"])[0] == 200


@pytest.fixture
def production_environment(environment, redis_prefix) -> dict:
    return environment | {
        **PRODUCTION,
        "RATELIMIT_KEY_PREFIX": redis_prefix,  # counts of its own, not those of earlier runs
        "ADMIN_USERNAME": "ops",
        "ADMIN_EMAIL": "ops@finstack.com",
        "ADMIN_PASSWORD": "ops-password-1",
    }


def test_production_start_migrates_then_serves_with_the_configured_admin(servers, production_environment, tmp_path):
    upgrade = subprocess.run(
        [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=production_environment, capture_output=True
    )
    assert upgrade.returncode == 0, upgrade.stderr.decode()

    server = servers.start(GUNICORN, production_environment)

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


def admin_session(server) -> tuple[str, str]:
    """The default admin's token and id."""
    body = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1]
    return body["access_token"], body["user"]["id"]


def create_tasks(server, token: str, assignee: str, count: int) -> list[str]:
    task = {"entity_name": "Race Co", "task_type": "Call", "task_time": "2025-01-01", "contact_person_id": assignee}
    return [call("POST", f"{server.url}/api/tasks", task, token)[1]["task"]["id"] for _ in range(count)]


def test_overlapping_bulk_updates_all_succeed(servers, environment):
    server = servers.start(GUNICORN, environment)
    token, admin_id = admin_session(server)
    ids = create_tasks(server, token, admin_id, 150)
    shuffle = random.Random(2026)
    batches = [(shuffle.sample(ids, 120), ("open", "closed")[n % 2]) for n in range(144)]

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(
            pool.map(
                lambda batch: call("PATCH", f"{server.url}/api/tasks/bulk-status",
                                   {"task_ids": batch[0], "status": batch[1]}, token),
                batches,
            )
        )  # fmt: skip

    assert [status for status, _ in results] == [200] * len(batches), [b for s, b in results if s != 200][:3]
    server.stop()
    assert "Traceback" not in server.log.read_text()


def test_edits_racing_deletes_answer_200_or_404(servers, environment):
    server = servers.start(GUNICORN, environment)
    token, admin_id = admin_session(server)
    ids = create_tasks(server, token, admin_id, 40)
    operations = [("DELETE", f"/api/tasks/{task_id}", None) for task_id in ids]
    operations += [("PUT", f"/api/tasks/{task_id}", {"note": "edited"}) for task_id in ids]
    operations += [("PATCH", f"/api/tasks/{task_id}/status", {"status": "closed"}) for task_id in ids]
    random.Random(7).shuffle(operations)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda op: (op[0], *call(op[0], f"{server.url}{op[1]}", op[2], token)), operations))

    assert {status for _, status, _ in results} <= {200, 404}, [r for r in results if r[1] not in (200, 404)][:3]
    assert sorted(status for method, status, _ in results if method == "DELETE") == [200] * len(ids)
    assert call("GET", f"{server.url}/api/tasks", token=token)[1]["pagination"]["total"] == 0
    server.stop()
    assert "Traceback" not in server.log.read_text()


def test_updated_at_never_goes_back_under_concurrent_edits(servers, environment):
    server = servers.start(GUNICORN, environment)
    token, admin_id = admin_session(server)

    def edit(task_id: str, n: int):
        if n % 4 == 3:
            body = {"task_ids": [task_id], "status": ("closed", "open")[n // 4 % 2]}  # each one changes it
            return call("PATCH", f"{server.url}/api/tasks/bulk-status", body, token)
        body = {"note": f"edit {n}"} if n % 2 else {"entity_name": f"Race Co {n}"}
        return call("PUT", f"{server.url}/api/tasks/{task_id}", body, token)

    for task_id in create_tasks(server, token, admin_id, 20):  # bursts of simultaneous edits of one task
        together = threading.Barrier(16)

        def at_once(n, task_id=task_id, together=together):
            together.wait()
            return edit(task_id, n)

        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(at_once, range(16)))

        assert {status for status, _ in results} == {200}
        stored = datetime.fromisoformat(
            call("GET", f"{server.url}/api/tasks/{task_id}", token=token)[1]["task"]["updated_at"]
        )
        replied = [datetime.fromisoformat(body["task"]["updated_at"]) for _, body in results if "task" in body]
        # Every edit that answered 200 had committed by then: none may look newer than the row as stored.
        assert all(stored >= at for at in replied), (stored, max(replied))


def test_the_login_limit_counts_across_workers_in_redis(servers, environment, redis_prefix):
    shared = environment | {
        "RATELIMIT_STORAGE_URI": REDIS_URL,
        "RATELIMIT_KEY_PREFIX": redis_prefix,
        "RATELIMIT_LOGIN": "6 per minute",
    }
    server = servers.start(GUNICORN, shared)

    def login(n):  # a new username each time: only the per-address limit applies
        return call("POST", f"{server.url}/api/auth/login", {"username": f"nobody{n}", "password": "not-it"})[0]

    with ThreadPoolExecutor(max_workers=WORKERS * 2) as pool:
        statuses = list(pool.map(login, range(10)))

    # Memory would let each worker count six; one store counts six in all, whichever worker answers.
    assert sorted(statuses) == [401] * 6 + [429] * 4, statuses


def test_revocations_hold_on_every_worker(servers, environment):
    access_log = ["--access-logfile", "-", "--access-logformat", "worker=%(p)s %(U)s %(s)s"]
    server = servers.start(gunicorn(*access_log), environment)
    admin_token, _ = admin_session(server)
    colleague = {"username": "leaver", "email": "leaver@example.com", "password": "leaving-soon", "full_name": "L"}
    leaver = call("POST", f"{server.url}/api/auth/register", colleague)[1]
    logged_out = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1]

    assert call("POST", f"{server.url}/api/auth/logout", token=logged_out["access_token"])[0] == 200
    patch = call("PATCH", f"{server.url}/api/users/{leaver['user']['id']}", {"is_active": False}, admin_token)
    assert patch[0] == 200

    tokens = [logged_out["access_token"], leaver["access_token"]] * (4 * WORKERS)
    deadline = time.monotonic() + 30
    workers = set()
    while len(workers) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(max_workers=4 * WORKERS) as pool:
            assert set(pool.map(lambda token: call("GET", f"{server.url}/api/auth/me", token=token)[0], tokens)) == {
                401
            }
        workers = set(re.findall(r"worker=<(\d+)> /api/auth/me 401", server.log.read_text()))
    assert len(workers) >= 2, server.log.read_text()
    assert call("GET", f"{server.url}/api/auth/me", token=admin_token)[0] == 200


def test_a_refresh_token_presented_twice_at_once_ends_its_session(servers, environment):
    server = servers.start(GUNICORN, environment)
    tokens = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1]
    together = threading.Barrier(2)

    def refresh(_):
        together.wait()
        return call("POST", f"{server.url}/api/auth/refresh", {"refresh_token": tokens["refresh_token"]})

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(refresh, range(2)))

    assert sorted(status for status, _ in results) == [200, 401], results
    rotated = next(body for status, body in results if status == 200)
    assert call("POST", f"{server.url}/api/auth/refresh", {"refresh_token": rotated["refresh_token"]})[0] == 401
    assert call("GET", f"{server.url}/api/auth/me", token=rotated["access_token"])[0] == 401
    server.stop()
    assert "Traceback" not in server.log.read_text()


def test_two_admins_demoting_each_other_at_once_leave_one_admin(servers, environment, fresh_database_url):
    server = servers.start(GUNICORN, environment)
    first_token, first_id = admin_session(server)
    deputy = {"username": "deputy", "email": "deputy@example.com", "password": "deputy-pass", "full_name": "D"}
    second = call("POST", f"{server.url}/api/auth/register", deputy)[1]
    assert call("PATCH", f"{server.url}/api/users/{second['user']['id']}", {"is_admin": True}, first_token)[0] == 200
    together = threading.Barrier(2)

    def demote(pair):
        token, target = pair
        together.wait()
        return call("PATCH", f"{server.url}/api/users/{target}", {"is_admin": False}, token)[0]

    with ThreadPoolExecutor(max_workers=2) as pool:
        statuses = list(pool.map(demote, [(first_token, second["user"]["id"]), (second["access_token"], first_id)]))

    # The second to get the lock finds itself demoted (403), or else the last admin (409).
    assert sorted(statuses) in ([200, 403], [200, 409]), statuses
    engine = sa.create_engine(fresh_database_url)
    with engine.connect() as connection:
        admins = connection.execute(sa.text("SELECT count(*) FROM app_users WHERE is_admin AND is_active")).scalar()
    engine.dispose()
    assert admins == 1


def test_parallel_guesses_cannot_outrun_the_failed_login_limit(servers, environment, redis_prefix):
    """Each password check is counted before it is made, atomically in Redis: of ten guesses sent at once from
    ten addresses, the account's ceiling lets three be checked and refuses seven, and then the real password, from
    an address the account never signed in from, waits too."""
    shared = environment | {
        "RATELIMIT_STORAGE_URI": REDIS_URL, "RATELIMIT_KEY_PREFIX": redis_prefix, "TRUSTED_PROXY_COUNT": "1",
        "RATELIMIT_LOGIN_FAILURES": "3 per 15 minutes", "RATELIMIT_LOGIN_FAILURES_ACCOUNT": "3 per hour",
    }  # fmt: skip
    server = servers.start(GUNICORN, shared)
    statuses = wrong_passwords_at_once(server.url, 10, lambda n: f"10.0.0.{n}")
    status, _ = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})

    assert sorted(statuses) == [401] * 3 + [429] * 7, statuses
    assert status == 429
