"""Several instances behind a load balancer: two gunicorn servers of the app on two ports share one database and
one Redis, and keep no state of their own that a request could depend on."""

import subprocess
import sys

import pytest

from helpers import PRODUCTION, ROOT, call, gunicorn

ADMIN = {"username": "ops", "password": "ops-password-1"}


@pytest.fixture
def instances(servers, environment, redis_prefix):
    """Two production instances, migrated once the way a deploy does it."""
    env = environment | {
        **PRODUCTION,
        "RATELIMIT_KEY_PREFIX": redis_prefix,
        "RATELIMIT_LOGIN": "4 per minute",
        "ADMIN_USERNAME": ADMIN["username"],
        "ADMIN_EMAIL": "ops@finstack.com",
        "ADMIN_PASSWORD": ADMIN["password"],
        "REGISTRATION": "open",  # the tests sign new accounts up (production's default is closed)
    }
    upgrade = subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=env, capture_output=True)
    assert upgrade.returncode == 0, upgrade.stderr.decode()
    command = gunicorn("--workers", "2")
    return servers.start(command, env), servers.start(command, env)


def log_in(server, username: str, password: str) -> dict:
    status, body = call("POST", f"{server.url}/api/auth/login", {"username": username, "password": password})
    assert status == 200, body
    return body


def register(server, username: str) -> dict:
    account = {"username": username, "email": f"{username}@example.com", "password": f"{username}-pass-1234",
               "full_name": username.title()}  # fmt: skip
    status, body = call("POST", f"{server.url}/api/auth/register", account)
    assert status == 201, body
    return body


def everywhere(instances, path: str, token: str) -> list[tuple[int, dict]]:
    """GET ``path`` on both instances often enough that each of their four workers most likely answers (and, by
    routes/auth.py's AuthCache, remembers the token's owner)."""
    return [call("GET", f"{server.url}{path}", token=token) for server in instances * 4]


def test_a_token_from_one_instance_works_on_the_other(instances):
    one, two = instances
    admin = log_in(one, **ADMIN)

    status, body = call("GET", f"{two.url}/api/auth/me", token=admin["access_token"])
    assert status == 200 and body["user"]["id"] == admin["user"]["id"]
    status, refreshed = call("POST", f"{two.url}/api/auth/refresh", {"refresh_token": admin["refresh_token"]})
    assert status == 200
    assert call("GET", f"{one.url}/api/tasks", token=refreshed["access_token"])[0] == 200


def test_logout_on_one_instance_is_honoured_by_the_other(instances):
    one = instances[0]
    session = register(one, "leaver")
    assert {status for status, _ in everywhere(instances, "/api/auth/me", session["access_token"])} == {200}

    assert call("POST", f"{one.url}/api/auth/logout", token=session["access_token"])[0] == 200

    for status, body in everywhere(instances, "/api/auth/me", session["access_token"]):
        assert status == 401 and body["error"] == "Token has been revoked: log in again."


def test_deactivation_on_one_instance_locks_the_user_out_of_both(instances):
    one, two = instances
    admin = log_in(one, **ADMIN)
    user = register(two, "gone")
    assert {status for status, _ in everywhere(instances, "/api/tasks", user["access_token"])} == {200}

    status, _ = call("PATCH", f"{two.url}/api/users/{user['user']['id']}", {"is_active": False}, admin["access_token"])
    assert status == 200

    for status, body in everywhere(instances, "/api/tasks", user["access_token"]):
        assert status == 401 and body["error"], body
    for server in (one, two):
        status, body = call("POST", f"{server.url}/api/auth/login", {"username": "gone", "password": "gone-pass-1234"})
        assert status == 401 and body["error"], body


def test_the_login_rate_limit_counts_across_both_instances(instances):
    one, two = instances
    statuses = []
    for server in (one, two, one, two, one, two):  # 4 per minute from this address, wherever they land
        status, body = call("POST", f"{server.url}/api/auth/login", {"username": "ops", "password": "no-such-pass"})
        statuses.append(status)

    assert statuses[:4] == [401] * 4
    assert statuses[4:] == [429, 429]
    assert body["error"] and "limit" in body["details"]


def test_role_profile_and_password_changes_reach_every_worker_of_both_instances(instances):
    """Each worker remembers a token's owner while Redis's accounts epoch stays (routes/auth.py's AuthCache):
    every change of an account starts a new one, wherever it is made."""
    one, two = instances
    admin = log_in(one, **ADMIN)
    session = register(one, "mover")
    other_session = log_in(two, "mover", "mover-pass-1234")

    def me_everywhere(token: str) -> list[tuple[int, dict]]:
        return everywhere(instances, "/api/auth/me", token)

    assert {body["user"]["is_admin"] for _, body in me_everywhere(session["access_token"])} == {False}
    user_id = session["user"]["id"]
    assert call("PATCH", f"{two.url}/api/users/{user_id}", {"is_admin": True}, admin["access_token"])[0] == 200
    assert {body["user"]["is_admin"] for _, body in me_everywhere(session["access_token"])} == {True}

    assert call("PATCH", f"{one.url}/api/users/me", {"full_name": "Moved On"}, other_session["access_token"])[0] == 200
    assert {body["user"]["full_name"] for _, body in me_everywhere(session["access_token"])} == {"Moved On"}

    change = {"current_password": "mover-pass-1234", "new_password": "a-much-newer-passphrase-42"}
    assert call("PUT", f"{two.url}/api/auth/password", change, other_session["access_token"])[0] == 200
    assert {status for status, _ in me_everywhere(session["access_token"])} == {401}
    assert {status for status, _ in me_everywhere(other_session["access_token"])} == {200}
