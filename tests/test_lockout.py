"""Lock-outs after failed passwords are no weapon: counted per account and client address (with lock-outs in a row
that double), under a much higher ceiling per account across addresses that spares the addresses its owner signs in
from; in memory and in the real Redis, on a clock the test moves; with Redis cut off mid-run (through a TCP proxy);
and once through a real proxy header on gunicorn."""

import time

import flask_limiter._extension
import limits.storage.memory
import limits.storage.redis
import pytest
import redis
from tcp_proxy import TcpProxy

import routes.errors
import routes.limits
from helpers import GUNICORN, PASSWORD, REDIS_URL, assert_error, call_with_headers, wrong_passwords_at_once

HOUR = 3600
DAY = 24 * HOUR


class Clock:
    """``time`` for the rate-limit code (limits' stores, Flask-Limiter, routes.limits and routes.errors): frozen at
    a whole second, moved on by hand. Redis keeps its own expiry times, but the moving windows compare timestamps
    that this clock writes, so they see the time it says."""

    def __init__(self):
        self.now = float(int(time.time()))

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    for module in (limits.storage.memory, limits.storage.redis, flask_limiter._extension, routes.limits, routes.errors):
        monkeypatch.setattr(module, "time", clock)
    return clock


def login(client, address: str, password: str = "wrong-password", username: str = "alice"):
    body = {"username": username, "password": password}
    return client.post("/api/auth/login", json=body, environ_base={"REMOTE_ADDR": address})


def assert_locked_out(response, limit: str) -> dict:
    body = assert_error(response, 429)
    assert body["details"]["limit"] == limit
    assert response.headers["Retry-After"] == str(body["details"]["retry_after"])
    assert "failed password attempts for this account" in body["error"]
    return body


def test_a_guesser_at_one_address_does_not_keep_the_owner_out_at_another(client, user, rate_limit_storage):
    """The default settings: five failures lock the account out at that address only."""
    assert [login(client, "203.0.113.66").status_code for _ in range(5)] == [401] * 5

    body = assert_locked_out(login(client, "203.0.113.66"), "5 per 15 minutes")
    assert "from your address" in body["error"]
    assert body["details"]["retry_after"] in (15 * 60, 15 * 60 - 1)
    assert_locked_out(login(client, "203.0.113.66", PASSWORD), "5 per 15 minutes")  # even with the password
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # the owner, at home


LADDER = [
    (15 * 60, "2 per 15 minutes"),
    (30 * 60, "2 per 30 minutes"),
    (HOUR, "2 per hour"),
    (2 * HOUR, "2 per 2 hours"),
    (4 * HOUR, "2 per 4 hours"),
    (8 * HOUR, "2 per 8 hours"),
    (16 * HOUR, "2 per 16 hours"),
]


def lock_out(client, clock, address: str, wait: int, limit: str) -> None:
    """Two failures at ``address`` lock it out for ``wait`` seconds from the second; then wait that out."""
    assert [login(client, address).status_code for _ in range(2)] == [401, 401]
    assert assert_locked_out(login(client, address), limit)["details"]["retry_after"] == wait
    clock.advance(wait - 1)
    assert assert_locked_out(login(client, address), limit)["details"]["retry_after"] == 1  # a second early
    clock.advance(2)


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_each_further_lock_out_in_a_row_at_one_address_lasts_twice_as_long_up_to_16_hours(
    client, user, clock, rate_limit_storage
):
    for wait, limit in [*LADDER, LADDER[-1]]:  # and the next one as long as the longest
        lock_out(client, clock, "203.0.113.66", wait, limit)

    # Guessing on: a guess about every five minutes for 64 hours. One address gets no more than 2 password checks of
    # the account in any 16 hours (the window filled: 2 checks in 15 minutes would lock it out for 15 minutes only).
    checked = []
    for _ in range(64 * 12):
        if login(client, "203.0.113.66").status_code == 401:
            checked.append(clock.now)
        clock.advance(301)
    assert len(checked) == 8, checked
    assert max(sum(1 for t in checked if start <= t < start + 16 * HOUR) for start in checked) == 2
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # all the while, from elsewhere


# A second either side of 32 hours: on the very second limits' memory store and its Redis store disagree.
@pytest.mark.parametrize(
    ("quiet", "wait", "limit"), [(32 * HOUR - 1, HOUR, "2 per hour"), (32 * HOUR + 1, 15 * 60, "2 per 15 minutes")]
)
@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_a_run_of_lock_outs_is_forgotten_32_hours_after_the_last_one_began(
    client, user, clock, rate_limit_storage, quiet, wait, limit
):
    lock_out(client, clock, "203.0.113.66", 15 * 60, "2 per 15 minutes")
    lock_out(client, clock, "203.0.113.66", 30 * 60, "2 per 30 minutes")
    clock.advance(quiet - 30 * 60 - 1)  # from the second lock-out's start

    assert [login(client, "203.0.113.66").status_code for _ in range(2)] == [401, 401]
    assert assert_locked_out(login(client, "203.0.113.66"), limit)["details"]["retry_after"] == wait


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_signing_in_at_the_address_forgives_its_run_of_lock_outs(client, user, clock, rate_limit_storage):
    lock_out(client, clock, "198.51.100.7", 15 * 60, "2 per 15 minutes")  # the owner, forgetful
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200

    lock_out(client, clock, "198.51.100.7", 15 * 60, "2 per 15 minutes")  # not 30 minutes


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_a_correct_password_forgives_the_failures_at_its_own_address_only(client, user, rate_limit_storage):
    assert [login(client, "203.0.113.66").status_code for _ in range(2)] == [401, 401]
    assert login(client, "198.51.100.7").status_code == 401  # the owner mistypes once, then gets it right

    assert login(client, "198.51.100.7", PASSWORD).status_code == 200
    assert [login(client, "198.51.100.7").status_code for _ in range(2)] == [401, 401]  # a fresh count
    assert_locked_out(login(client, "203.0.113.66", PASSWORD), "2 per 15 minutes")


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes", RATELIMIT_LOGIN_FAILURES_ACCOUNT="3 per hour")
def test_the_ceiling_of_the_account_spares_the_addresses_its_owner_signed_in_from(
    client, user, make_user, rate_limit_storage
):
    make_user("bob")
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # a new address then: counted, like any
    for n in range(2):  # guessers at other addresses
        assert login(client, f"203.0.113.{n}").status_code == 401

    body = assert_locked_out(login(client, "203.0.113.99", PASSWORD), "3 per hour")
    assert "from your address" not in body["error"]
    assert body["details"]["retry_after"] in (3600, 3599)
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # the owner's usual address
    assert login(client, "203.0.113.99", PASSWORD, username="bob").status_code == 200  # another account


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes", RATELIMIT_LOGIN_FAILURES_ACCOUNT="3 per hour")
def test_an_address_is_spared_for_30_days_after_its_last_sign_in(client, user, clock, rate_limit_storage):
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200
    clock.advance(29 * DAY)
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # 30 days from here, not from the first
    clock.advance(29 * DAY)
    for n in range(3):
        assert login(client, f"203.0.113.{n}").status_code == 401
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200

    clock.advance(31 * DAY)
    for n in range(3):
        assert login(client, f"203.0.113.{n}").status_code == 401
    assert_locked_out(login(client, "198.51.100.7", PASSWORD), "3 per hour")
    clock.advance(3600 + 1)
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # the ceiling's hour has passed


def test_behind_a_proxy_parallel_guesses_lock_out_their_own_address_only(servers, environment, redis_prefix):
    """gunicorn with several workers, one Redis, the client address from X-Forwarded-For (one trusted proxy):
    of eight guesses sent at once from one address three are checked, and only those three spend from the account's
    ceiling, so that a guess from another address is still checked and the owner elsewhere still signs in."""
    shared = environment | {
        "RATELIMIT_STORAGE_URI": REDIS_URL, "RATELIMIT_KEY_PREFIX": redis_prefix, "TRUSTED_PROXY_COUNT": "1",
        "RATELIMIT_LOGIN_FAILURES": "3 per 15 minutes", "RATELIMIT_LOGIN_FAILURES_ACCOUNT": "5 per hour",
    }  # fmt: skip
    server = servers.start(GUNICORN, shared)
    url = f"{server.url}/api/auth/login"
    statuses = wrong_passwords_at_once(server.url, 8, lambda _n: "6.6.6.6, 203.0.113.66")
    admin = {"username": "admin", "password": "admin123"}
    locked = call_with_headers("POST", url, admin, headers={"X-Forwarded-For": "203.0.113.66"})
    elsewhere = call_with_headers("POST", url, admin | {"password": "guess"}, headers={"X-Forwarded-For": "192.0.2.1"})
    owner = call_with_headers("POST", url, admin, headers={"X-Forwarded-For": "7.7.7.7, 198.51.100.7"})

    assert sorted(statuses) == [401] * 3 + [429] * 5, statuses
    assert locked[0] == 429 and locked[1]["details"]["limit"] == "3 per 15 minutes", locked
    assert locked[2]["Retry-After"] == str(locked[1]["details"]["retry_after"])
    assert elsewhere[0] == 401, elsewhere  # the fourth check of the account's five an hour
    assert owner[0] == 200, owner  # the fifth
    server.stop()
    assert "Traceback" not in server.log.read_text()


def password_keys(store: redis.Redis, prefix: str) -> dict[str, int]:
    """The keys of the test's prefix in Redis that count password checks, with their lifetimes in seconds."""
    keys = store.scan_iter(f"*{prefix}/*")
    return {key.decode(): store.ttl(key) for key in keys if b"/auth.login/" not in key and b"/username:" in key}


@pytest.mark.app_config(RATELIMIT_STORAGE_URI=REDIS_URL)
def test_a_failed_login_leaves_few_keys_in_redis_and_none_for_long(client, user, redis_prefix):
    """The defaults: a failure is one key for 15 minutes and the account's ceiling (two keys, an hour and a day,
    per account); a lock-out one more, for 32 hours; signing in one more for 30 days."""
    store = redis.Redis.from_url(REDIS_URL)
    assert login(client, "203.0.113.66", username="nobody").status_code == 401
    keys = password_keys(store, redis_prefix)
    assert sorted(key.split("/username:nobody/")[1] for key in keys) == [
        "address:203.0.113.66/failures/5/900", "password-attempts/100/1/hour", "password-attempts/500/1/day",
    ], keys  # fmt: skip
    assert 0 < keys[next(key for key in keys if "/failures/" in key)] <= 900

    for _ in range(4):
        assert login(client, "203.0.113.66", username="nobody").status_code == 401
    assert_locked_out(login(client, "203.0.113.66", username="nobody"), "5 per 15 minutes")
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200
    keys = password_keys(store, redis_prefix)
    store.close()

    lock_outs = [ttl for key, ttl in keys.items() if "/lock-out/" in key]
    signed_in = [ttl for key, ttl in keys.items() if key.endswith("/signed-in")]
    # Each account's ceiling (2 + 2); nobody's failures at one address and its lock-out; alice's mark (her failures
    # were forgiven).
    assert len(keys) == 2 + 2 + 1 + 1 + 1, keys
    assert len(lock_outs) == 1 and 31 * HOUR < lock_outs[0] <= 32 * HOUR, keys
    assert len(signed_in) == 1 and 29 * DAY < signed_in[0] <= 30 * DAY, keys


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes", RATELIMIT_LOGIN_FAILURES_ACCOUNT="3 per hour")
def test_a_changed_password_forgets_the_addresses_the_account_signed_in_from(client, user, rate_limit_storage):
    """The old password may be what a guesser found: the addresses it signed in from are spared no more, except
    the one the password was changed at."""
    token = login(client, "198.51.100.7", PASSWORD).get_json()["access_token"]  # the first of three an hour
    change = {"current_password": PASSWORD, "new_password": "brand-new-passphrase"}
    headers = {"Authorization": f"Bearer {token}"}
    address = {"REMOTE_ADDR": "192.0.2.1"}
    assert client.put("/api/auth/password", json=change, headers=headers, environ_base=address).status_code == 200
    assert login(client, "203.0.113.1").status_code == 401  # the third

    assert_locked_out(login(client, "198.51.100.7", "brand-new-passphrase"), "3 per hour")  # no longer spared
    assert login(client, "192.0.2.1", "brand-new-passphrase").status_code == 200


@pytest.fixture
def redis_line(request, redis_prefix):
    """Redis through a TCP proxy that the test can cut, for an app whose RATELIMIT_STORAGE_URI points at it."""
    with TcpProxy("127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])) as proxy:
        request.node.add_marker(
            pytest.mark.app_config(
                RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{proxy.port}/0",
                RATELIMIT_LOGIN_FAILURES="2 per 15 minutes",
                RATELIMIT_LOGIN_FAILURES_ACCOUNT="3 per hour",
            )
        )
        yield proxy


def test_while_redis_is_out_of_reach_each_worker_counts_failed_passwords_without_the_known_addresses(
    redis_line, clock, client, user
):
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # known, in Redis
    redis_line.cut()

    assert [login(client, "203.0.113.66").status_code for _ in range(2)] == [401, 401]
    assert_locked_out(login(client, "203.0.113.66"), "2 per 15 minutes")  # counted in this worker's memory
    assert login(client, "203.0.113.67").status_code == 401  # the third of the account's three an hour
    assert_locked_out(login(client, "198.51.100.7", PASSWORD), "3 per hour")  # memory never knew this address

    redis_line.restore()
    clock.advance(3)  # Flask-Limiter tries Redis again a second or two after it failed, and finds it back
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # known again, nothing spent in Redis
    assert login(client, "203.0.113.66").status_code == 401  # what memory counted stays behind
