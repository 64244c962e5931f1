"""Checking a token without the database (routes/auth.py's AuthCache): a verified token is decoded once per process
until it expires, and its owner is read once per accounts epoch, a value in Redis that the rate limiter reads in its
round trip. Every change of a user or of the blocklist starts a new epoch once committed, so that each instance
reads afresh (tests/test_instances.py checks it across two servers)."""

import uuid
from datetime import timedelta

import pytest
from flask_jwt_extended import JWTManager, decode_token

from helpers import PASSWORD, REDIS_URL, assert_error, token_for, tokens_for
from models import User, db
from routes.auth import OWNER_CACHE_SECONDS, AuthCache

IN_REDIS = pytest.mark.app_config(RATELIMIT_STORAGE_URI=REDIS_URL)


def epoch(app) -> bytes | None:
    store = app.extensions["rate_limiter"].storage
    return store.get_connection().get(store.prefixed_key(store.epoch_key))


@pytest.fixture
def redis_epoch(app, redis_prefix) -> None:
    """An epoch in Redis, as there is once anyone has signed in (a new user alone starts none: no cache holds it)."""
    app.extensions["rate_limiter"].storage.start_accounts_epoch()


def rename_behind_the_apps_back(app, full_name: str) -> None:
    """Change alice as another instance would, short of its new epoch (no ORM events here)."""
    with app.app_context():
        update = f"UPDATE app_users SET full_name = '{full_name}' WHERE username = 'alice'"
        db.session.connection().exec_driver_sql(update)
        db.session.commit()


def full_name(client, headers) -> str:
    response = client.get("/api/auth/me", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["user"]["full_name"]


class Clock:
    def __init__(self, now: float = 1e9):
        self.now = now

    def __call__(self) -> float:
        return self.now


@IN_REDIS
def test_a_token_owner_is_read_once_per_epoch(app, client, auth_headers, sql_statements, redis_epoch):
    with sql_statements() as statements:
        assert full_name(client, auth_headers) == "Alice Adams"
    assert len(statements) == 1  # the user and the blocklist, in one statement
    with sql_statements() as statements:
        assert full_name(client, auth_headers) == "Alice Adams"
        assert client.get("/api/tasks", headers=auth_headers).status_code == 200
    assert len(statements) == 2  # the page and its total, then the dashboard of nothing: no owner read
    assert all("app_users.password_hash" not in statement for statement in statements)


@IN_REDIS
def test_a_new_epoch_in_redis_makes_the_owner_read_again(app, client, auth_headers, redis_epoch):
    assert full_name(client, auth_headers) == "Alice Adams"
    rename_behind_the_apps_back(app, "Alice Bennet")
    assert full_name(client, auth_headers) == "Alice Adams"  # remembered: this is the read the cache saves

    store = app.extensions["rate_limiter"].storage
    store.start_accounts_epoch()  # what the other instance does after its commit
    assert full_name(client, auth_headers) == "Alice Bennet"


@IN_REDIS
def test_a_remembered_owner_is_read_again_after_a_minute_whatever_redis_says(app, client, auth_headers, redis_epoch):
    clock = Clock()
    app.extensions["finstack.auth"] = AuthCache.for_app(app, clock=clock)
    assert full_name(client, auth_headers) == "Alice Adams"
    rename_behind_the_apps_back(app, "Alice Bennet")  # and its new epoch lost: Redis was down just then

    clock.now += OWNER_CACHE_SECONDS - 1
    assert full_name(client, auth_headers) == "Alice Adams"
    clock.now += 1
    assert full_name(client, auth_headers) == "Alice Bennet"


@IN_REDIS
def test_without_an_epoch_in_redis_one_is_started_and_the_owner_read(app, client, auth_headers, redis_prefix):
    store = app.extensions["rate_limiter"].storage
    store.get_connection().delete(store.prefixed_key(store.epoch_key))  # a new Redis, or one that lost its data

    assert full_name(client, auth_headers) == "Alice Adams"
    started = epoch(app)
    assert started is not None
    rename_behind_the_apps_back(app, "Alice Bennet")
    assert full_name(client, auth_headers) == "Alice Bennet"  # read under no epoch: not remembered
    assert full_name(client, auth_headers) == "Alice Bennet"
    assert epoch(app) == started


@pytest.mark.app_config(RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0")
def test_with_redis_out_of_reach_every_request_reads_its_owner(app, client, auth_headers, sql_statements):
    for _ in range(2):
        with sql_statements() as statements:
            assert full_name(client, auth_headers) == "Alice Adams"
        assert len(statements) == 1


def test_with_limits_in_memory_every_request_reads_its_owner(app, client, auth_headers, sql_statements):
    for _ in range(2):
        with sql_statements() as statements:
            assert full_name(client, auth_headers) == "Alice Adams"
        assert len(statements) == 1


def log_in(client, username: str, password: str = PASSWORD) -> dict:
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.get_json()
    return {"Authorization": f"Bearer {response.get_json()['access_token']}"}


def logout(client, headers, admin_headers, user) -> None:
    assert client.post("/api/auth/logout", headers=headers).status_code == 200


def deactivate(client, headers, admin_headers, user) -> None:
    response = client.patch(f"/api/users/{user['id']}", json={"is_active": False}, headers=admin_headers)
    assert response.status_code == 200, response.get_json()


def make_admin(client, headers, admin_headers, user) -> None:
    response = client.patch(f"/api/users/{user['id']}", json={"is_admin": True}, headers=admin_headers)
    assert response.status_code == 200, response.get_json()


def rename(client, headers, admin_headers, user) -> None:
    other_session = log_in(client, user["username"])
    response = client.patch("/api/users/me", json={"full_name": "Alice Bennet"}, headers=other_session)
    assert response.status_code == 200, response.get_json()


def change_password_elsewhere(client, headers, admin_headers, user) -> None:
    other_session = log_in(client, user["username"])
    body = {"current_password": PASSWORD, "new_password": "a-much-newer-passphrase-42"}
    assert client.put("/api/auth/password", json=body, headers=other_session).status_code == 200


@IN_REDIS
@pytest.mark.parametrize(
    ("change", "seen"),
    [
        (logout, lambda response: response.status_code == 401),
        (deactivate, lambda response: response.status_code == 401),
        (make_admin, lambda response: response.get_json()["user"]["is_admin"] is True),
        (rename, lambda response: response.get_json()["user"]["full_name"] == "Alice Bennet"),
        (change_password_elsewhere, lambda response: response.status_code == 401),
    ],
)
def test_every_change_of_an_account_starts_a_new_epoch(app, client, user, admin_headers, redis_prefix, change, seen):
    headers = log_in(client, user["username"])
    assert client.get("/api/auth/me", headers=headers).status_code == 200  # remembered now
    before = epoch(app)

    change(client, headers, admin_headers, user)

    assert epoch(app) not in (before, None)
    assert seen(client.get("/api/auth/me", headers=headers))


@IN_REDIS
def test_reads_and_logins_start_no_epoch(app, client, user, redis_epoch):
    headers = log_in(client, user["username"])
    before = epoch(app)

    assert client.get("/api/auth/me", headers=headers).status_code == 200
    assert client.get("/api/tasks", headers=headers).status_code == 200
    log_in(client, user["username"])

    assert epoch(app) == before


def count_decodes(monkeypatch) -> list:
    """Flask-JWT-Extended's decode (signature and claims) of each token: appended to the list returned."""
    decoded = []
    decode = JWTManager._decode_jwt_from_config
    monkeypatch.setattr(JWTManager, "_decode_jwt_from_config", lambda *args: decoded.append(args[1]) or decode(*args))
    return decoded


def test_a_token_is_decoded_once_until_it_expires(app, client, user, monkeypatch):
    clock = Clock(0)
    app.extensions["finstack.auth"] = AuthCache.for_app(app, clock=clock)
    token = tokens_for(app, user["id"])["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    decoded = count_decodes(monkeypatch)

    for _ in range(3):
        assert client.get("/api/auth/me", headers=headers).status_code == 200
    assert len(decoded) == 1

    with app.app_context():
        clock.now = decode_token(token)["exp"]  # at its expiry: not remembered any more
    assert client.get("/api/auth/me", headers=headers).status_code == 200  # PyJWT checks on the real clock
    assert len(decoded) == 3  # the limiter's key and the login check, each afresh


def test_a_refused_token_is_refused_afresh_each_time(app, client, user, monkeypatch):
    expired = token_for(app, user["id"], expires_delta=timedelta(seconds=-1))
    decoded = count_decodes(monkeypatch)

    for _ in range(2):
        assert_error(client.get("/api/auth/me", headers={"Authorization": f"Bearer {expired}"}), 401)

    assert len(decoded) == 4  # the limiter's key and the login check, each time


@IN_REDIS
@pytest.mark.parametrize("outer", ["commit", "rollback"])
def test_a_savepoint_rolled_back_leaves_the_change_before_it_to_start_an_epoch(
    app, client, user, auth_headers, redis_prefix, outer
):
    assert client.get("/api/auth/me", headers=auth_headers).status_code == 200
    before = epoch(app)
    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).is_active = False
        db.session.flush()
        db.session.begin_nested().rollback()
        getattr(db.session, outer)()

    status = client.get("/api/auth/me", headers=auth_headers).status_code
    assert (epoch(app) != before, status) == ((True, 401) if outer == "commit" else (False, 200))


@IN_REDIS
def test_a_change_while_limits_count_in_memory_starts_its_epoch_once_redis_is_back(app, client, user, redis_prefix):
    headers = log_in(client, user["username"])
    assert client.get("/api/auth/me", headers=headers).status_code == 200
    before = epoch(app)
    limiter = app.extensions["rate_limiter"]
    limiter._storage_dead = True  # as Flask-Limiter marks it when Redis fails: no change may wait for Redis then

    rename(client, headers, None, user)
    assert epoch(app) == before
    assert app.extensions["finstack.auth"].epoch_owed

    limiter._storage_dead = False  # as Flask-Limiter's check finds Redis again
    assert full_name(client, headers) == "Alice Bennet"
    assert epoch(app) not in (before, None)
    assert not app.extensions["finstack.auth"].epoch_owed


@IN_REDIS
def test_new_accounts_epoch_command_makes_every_worker_read_afresh(app, client, runner, auth_headers, redis_epoch):
    assert full_name(client, auth_headers) == "Alice Adams"
    rename_behind_the_apps_back(app, "Alice Bennet")  # in SQL, as an operator might
    assert full_name(client, auth_headers) == "Alice Adams"

    result = runner.invoke(args=["new-accounts-epoch"])

    assert result.exit_code == 0 and "Started a new accounts epoch" in result.output, result.output
    assert full_name(client, auth_headers) == "Alice Bennet"


def test_new_accounts_epoch_command_without_redis_says_there_is_nothing_to_do(runner):
    result = runner.invoke(args=["new-accounts-epoch"])
    assert result.exit_code == 0 and "Nothing to do" in result.output, result.output
