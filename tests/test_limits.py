"""Rate limits: strict on login, register and refresh, generous elsewhere; 429 with the envelope and Retry-After
(and Retry-After on nothing else but a 503, with its own), counted in memory and in the real Redis; client addresses
through exactly TRUSTED_PROXY_COUNT proxies. Lock-outs after failed passwords: tests/test_lockout.py."""

import flask_jwt_extended.jwt_manager
import pytest
import redis
from flask import g
from flask_limiter import RateLimitExceeded
from sqlalchemy import text
from tcp_proxy import TcpProxy

from app import create_app
from helpers import PASSWORD, REDIS_URL, assert_error, settings, tokens_for
from models import db

STRICT_LIMITS = {
    "RATELIMIT_LOGIN": "3 per minute",
    "RATELIMIT_REGISTER": "2 per minute",
    "RATELIMIT_REFRESH": "2 per minute",
    "RATELIMIT_LOGIN_FAILURES": "2 per 15 minutes",
    "RATELIMIT_LOGIN_FAILURES_ACCOUNT": "3 per hour",
    "RATELIMIT_DEFAULT": "4 per minute",
}
STRICT = pytest.mark.app_config(**STRICT_LIMITS)
# For a run of password checks from one address that the per-address limit of the route must not cut short.
STRICT_PASSWORDS = pytest.mark.app_config(**STRICT_LIMITS | {"RATELIMIT_LOGIN": "10 per minute"})


def login(client, username="alice", password=PASSWORD, address="127.0.0.1", forwarded_for=None):
    return client.post(
        "/api/auth/login",
        json={"username": username, "password": password},
        headers={"X-Forwarded-For": forwarded_for} if forwarded_for else {},
        environ_base={"REMOTE_ADDR": address},
    )


def assert_rate_limited(response, limit: str | None = None) -> dict:
    """A 429 in the one shape every 429 has: details {retry_after, limit}, and Retry-After saying the same."""
    body = assert_error(response, 429)
    assert set(body["details"]) == {"retry_after", "limit"}, body
    assert 1 <= body["details"]["retry_after"] <= 3600
    assert response.headers["Retry-After"] == str(body["details"]["retry_after"])
    if limit is not None:
        assert body["details"]["limit"] == limit
    assert "try again" in body["error"].lower()
    return body


@STRICT
def test_login_is_limited_per_client_address(client, user, rate_limit_storage):
    assert [login(client).status_code for _ in range(3)] == [200, 200, 200]

    assert_rate_limited(login(client), limit="3 per minute")
    assert login(client, address="10.0.0.2").status_code == 200  # another address has its own count


@STRICT
def test_ipv6_clients_count_per_64_block(client, user, rate_limit_storage):
    for host in range(1, 4):
        assert login(client, address=f"2001:db8:aaaa:1::{host}").status_code == 200

    assert_rate_limited(login(client, address="2001:db8:aaaa:1:ffff::9"))
    assert login(client, address="2001:db8:aaaa:2::1").status_code == 200  # the next /64 is someone else


@STRICT
def test_failed_logins_are_limited_per_username_and_address(client, user, make_user, rate_limit_storage):
    make_user("bob")
    assert login(client, password="wrong-password", address="10.0.0.1").status_code == 401
    assert login(client, password="wrong-password", address="10.0.0.1").status_code == 401

    # Now even the right password waits at that address, whatever the case of the name.
    body = assert_rate_limited(login(client, username=" ALICE", address="10.0.0.1"), limit="2 per 15 minutes")
    assert "failed password attempts" in body["error"]
    assert login(client, username="bob", address="10.0.0.2").status_code == 200  # the per-address limit is 3


@STRICT
def test_failed_logins_from_many_addresses_meet_the_ceiling_of_the_account(client, user, make_user, rate_limit_storage):
    make_user("bob")
    for n in range(3):
        assert login(client, password="wrong-password", address=f"10.0.0.{n}").status_code == 401

    body = assert_rate_limited(login(client, username=" ALICE", address="10.0.0.9"), limit="3 per hour")
    assert "failed password attempts for this account" in body["error"]
    assert login(client, username="bob", address="10.0.0.9").status_code == 200


@STRICT_PASSWORDS
def test_a_successful_login_forgives_the_failures_before_it(client, user, rate_limit_storage):
    attempts = [("wrong-password", 401), (PASSWORD, 200), ("wrong-password", 401), ("wrong-password", 401)]
    for password, status in attempts:
        assert login(client, password=password, address="10.0.0.1").status_code == status

    assert_rate_limited(login(client, address="10.0.0.1"), limit="2 per 15 minutes")


@STRICT_PASSWORDS
def test_wrong_current_passwords_spend_the_same_budget_as_failed_logins(app, client, user, rate_limit_storage):
    """A stolen access token must not make guessing the password cheaper than logging in."""
    headers = {"Authorization": f"Bearer {tokens_for(app, user['id'])['access_token']}"}

    def change(current, address):
        body = {"current_password": current, "new_password": "brand-new-passphrase"}
        return client.put("/api/auth/password", json=body, headers=headers, environ_base={"REMOTE_ADDR": address})

    assert_error(change("guess-one", "10.0.0.1"), 400, "current_password")
    assert_error(change("guess-two", "10.0.0.1"), 400, "current_password")

    assert_rate_limited(change(PASSWORD, "10.0.0.1"), limit="2 per 15 minutes")
    assert_rate_limited(login(client, address="10.0.0.1"), limit="2 per 15 minutes")
    assert login(client, address="10.0.0.2").status_code == 200  # the owner, elsewhere


@STRICT
def test_register_is_limited_per_client_address(client, rate_limit_storage):
    def register(n):
        user = {"username": f"new{n}", "email": f"new{n}@example.com", "password": "pass-word-1", "full_name": "N"}
        return client.post("/api/auth/register", json=user)

    assert [register(n).status_code for n in range(2)] == [201, 201]
    assert_rate_limited(register(3))


@STRICT
def test_refresh_is_limited_per_client_address(app, client, user, rate_limit_storage):
    def refresh():
        token = tokens_for(app, user["id"])["refresh_token"]
        return client.post("/api/auth/refresh", headers={"Authorization": f"Bearer {token}"})

    assert [refresh().status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(refresh())


@STRICT
def test_other_routes_have_a_default_limit_per_route_and_signed_in_user(
    app, client, user, other_user, rate_limit_storage
):
    alice = {"Authorization": f"Bearer {tokens_for(app, user['id'])['access_token']}"}
    bob = {"Authorization": f"Bearer {tokens_for(app, other_user['id'])['access_token']}"}

    assert [client.get("/api/tasks", headers=alice).status_code for _ in range(4)] == [200] * 4
    response = client.get("/api/tasks", headers=alice)

    assert_rate_limited(response, limit="4 per minute")
    assert response.headers["X-RateLimit-Limit"] == "4"
    assert client.get("/api/tasks", headers=bob).status_code == 200  # a colleague behind the same address


def test_a_signed_in_request_decodes_its_token_once(app, client, auth_headers, monkeypatch):
    """The limiter's key (the caller's account) and the login check share one decode of the token."""
    decoded = []
    decode = flask_jwt_extended.jwt_manager._decode_jwt
    monkeypatch.setattr(flask_jwt_extended.jwt_manager, "_decode_jwt", lambda **kw: decoded.append(1) or decode(**kw))

    assert client.get("/api/tasks", headers=auth_headers).status_code == 200
    assert app.extensions["rate_limiter"].enabled
    assert len(decoded) == 1


@pytest.mark.app_config(**STRICT_LIMITS, RATELIMIT_STORAGE_URI=REDIS_URL)
def test_a_counted_request_takes_one_round_trip_to_redis(app, client, auth_headers, redis_prefix, monkeypatch):
    """The hit and the X-RateLimit-* headers' figures come back together (routes.limits.CountingRedisStorage)."""
    store = app.extensions["rate_limiter"].limiter.storage.get_connection()
    first = client.get("/api/tasks", headers=auth_headers)  # Redis may have to load the script: not counted
    assert first.headers["X-RateLimit-Remaining"] == "3"
    commands = []
    execute = store.execute_command
    monkeypatch.setattr(store, "execute_command", lambda *args, **kw: commands.append(args[0]) or execute(*args, **kw))

    for remaining in (2, 1, 0):
        commands.clear()
        response = client.get("/api/tasks", headers=auth_headers)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert commands == ["EVALSHA"]
    assert_rate_limited(client.get("/api/tasks", headers=auth_headers), limit="4 per minute")


@STRICT
def test_anonymous_callers_are_counted_per_address(client, rate_limit_storage):
    for _ in range(4):
        assert_error(client.get("/api/tasks"), 401)

    assert_rate_limited(client.get("/api/tasks"))


@STRICT
def test_preflights_and_health_checks_are_never_limited(client, user, rate_limit_storage):
    preflight = {"Origin": "http://localhost:4200", "Access-Control-Request-Method": "POST"}
    for _ in range(5):
        assert client.options("/api/auth/login", headers=preflight).status_code == 200
        assert client.options("/api/tasks", headers=preflight).status_code == 200
        assert client.get("/api/health").status_code == 200

    assert login(client).status_code == 200
    assert client.get("/api/tasks", headers={"Authorization": f"Bearer {login(client).get_json()['access_token']}"})


@pytest.mark.app_config(RATELIMIT_ENABLED=False, RATELIMIT_LOGIN="1 per minute")
def test_limits_can_be_switched_off(client, user):
    assert [login(client).status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.app_config(RATELIMIT_STORAGE_URI=REDIS_URL)
def test_the_counts_live_in_redis(client, user, redis_prefix):
    store = redis.Redis.from_url(REDIS_URL)
    login(client)

    assert list(store.scan_iter(f"*{redis_prefix}*"))
    store.close()


@pytest.mark.app_config(RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0", RATELIMIT_LOGIN="2 per minute")
def test_an_unreachable_redis_falls_back_to_memory_and_still_limits(client, user):
    assert [login(client).status_code for _ in range(2)] == [200, 200]

    assert_rate_limited(login(client))


@pytest.mark.app_config(RATELIMIT_LOGIN="2 per minute")
def test_forwarded_for_is_ignored_without_trusted_proxies(client, user):
    """A direct client cannot dodge its limit by inventing X-Forwarded-For addresses."""
    assert login(client, forwarded_for="10.0.0.1").status_code == 200
    assert login(client, forwarded_for="10.0.0.2").status_code == 200

    assert_rate_limited(login(client, forwarded_for="10.0.0.3"))


@pytest.mark.app_config(RATELIMIT_LOGIN="2 per minute", TRUSTED_PROXY_COUNT=1)
def test_behind_one_proxy_the_address_it_saw_counts(client, user, caplog):
    """Render's load balancer appends the address it saw; anything a client wrote before that is not trusted."""
    for _ in range(2):
        assert login(client, forwarded_for="6.6.6.6, 10.0.0.1").status_code == 200
    assert_rate_limited(login(client, forwarded_for="7.7.7.7, 10.0.0.1"))
    assert "exceeded on POST /api/auth/login from 10.0.0.1" in caplog.text  # the logs name the client too

    assert login(client, forwarded_for="6.6.6.6, 10.0.0.2").status_code == 200


def test_each_app_keeps_its_own_limits(tmp_path, fresh_database_url):
    strict = create_app(settings(fresh_database_url, tmp_path, RATELIMIT_LOGIN="1 per minute"))
    generous = create_app(settings(fresh_database_url, tmp_path / "other", RATELIMIT_LOGIN="50 per minute"))

    statuses = [strict.test_client().post("/api/auth/login", json={}).status_code for _ in range(2)]
    assert statuses == [400, 429]
    assert generous.test_client().post("/api/auth/login", json={}).status_code == 400


@STRICT
def test_retry_after_is_sent_with_429_only(client, user, rate_limit_storage):
    """Flask-Limiter would send it on every response it counts; a client that honours it would wait for nothing."""
    token = login(client).get_json()["access_token"]
    answers = [
        client.get("/api/tasks", headers={"Authorization": f"Bearer {token}"}),  # 200
        login(client, password="wrong-password", address="10.0.0.5"),  # 401
        client.get("/api/tasks"),  # 401
        client.get("/api/tasks/not-a-task", headers={"Authorization": f"Bearer {token}"}),  # 404
        client.post("/api/auth/register", json={"username": ""}),  # 400
    ]

    assert [answer.status_code for answer in answers] == [200, 401, 401, 404, 400]
    assert answers[0].headers["X-RateLimit-Limit"] == "4"  # counted, and said so
    for answer in answers:
        assert "Retry-After" not in answer.headers, answer.status_code


@pytest.mark.app_config(RATELIMIT_LOGIN="1 per minute")
def test_retry_after_says_what_the_details_say(client, user):
    """Flask-Limiter's own figure rounds down (to 0 at the last second); the header and the body agree."""
    login(client)
    response = login(client)

    body = assert_rate_limited(response, limit="1 per minute")
    assert 59 <= body["details"]["retry_after"] <= 60


def test_a_503_says_when_to_come_back_not_when_the_rate_limit_resets(app, client, auth_headers):
    """Flask-Limiter puts its own Retry-After (the end of the minute the request was counted in) on every answer
    it counts; the database's absence is a matter of seconds."""
    with app.app_context():
        db.session.execute(text("DROP TABLE tasks"))
        db.session.commit()

    response = client.get("/api/tasks", headers=auth_headers)

    assert_error(response, 503)
    assert response.headers["X-RateLimit-Limit"] == "300"  # counted
    assert response.headers["Retry-After"] == "5"


@pytest.fixture
def redis_line(redis_prefix):
    with TcpProxy("127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])) as proxy:
        yield proxy


@pytest.mark.parametrize("window_kept", [True, False])
def test_redis_failing_after_it_refused_a_request_is_still_a_429(
    redis_line, redis_prefix, tmp_path, fresh_database_url, caplog, window_kept
):
    """The 429's Retry-After comes from the window's state that the round trip counting the request brought back
    (routes.limits.CountingRedisStorage): exact, even if Redis has gone since. Without that state at hand the
    handler asks the store; if Redis has gone meanwhile, Retry-After is the whole window."""
    app = create_app(
        settings(
            fresh_database_url, tmp_path, RATELIMIT_LOGIN="1 per minute", RATELIMIT_KEY_PREFIX=redis_prefix,
            RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{redis_line.port}/0",
        )
    )  # fmt: skip
    handlers = app.error_handler_spec[None][429]
    handle = handlers[RateLimitExceeded]

    def cut_then_handle(error):
        redis_line.cut()  # after the limiter counted this request in Redis, before the handler needs the window
        if not window_kept:
            g.moving_windows.clear()
        return handle(error)

    handlers[RateLimitExceeded] = cut_then_handle
    client = app.test_client()
    assert client.post("/api/auth/login", json={}).status_code == 400

    body = assert_rate_limited(client.post("/api/auth/login", json={}), limit="1 per minute")
    if window_kept:
        assert 58 <= body["details"]["retry_after"] <= 60
        assert "Rate-limit store unreachable" not in caplog.text
    else:
        assert body["details"]["retry_after"] == 60
        assert "Retry-After is the limit's whole window" in caplog.text
