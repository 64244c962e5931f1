"""Lock-outs after failed passwords are no weapon: counted per account and client address (with waits that double),
under a much higher ceiling per account across addresses that spares the addresses its owner signs in from; in
memory and in the real Redis, on a clock the test moves, and once through a real proxy header on gunicorn."""

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import flask_limiter._extension
import limits.storage.memory
import limits.storage.redis
import pytest

import routes.errors
import routes.limits
from helpers import GUNICORN, PASSWORD, REDIS_URL, assert_error, call_with_headers

DAY = 24 * 3600


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


@pytest.mark.app_config(RATELIMIT_LOGIN_FAILURES="2 per 15 minutes")
def test_each_further_lock_out_at_one_address_lasts_twice_as_long_up_to_16_hours(
    client, user, clock, rate_limit_storage
):
    ladder = [
        (15 * 60, "2 per 15 minutes"),
        (30 * 60, "4 per 45 minutes"),
        (60 * 60, "6 per 105 minutes"),
        (2 * 3600, "8 per 225 minutes"),
        (4 * 3600, "10 per 465 minutes"),
        (8 * 3600, "12 per 945 minutes"),
        (16 * 3600, "14 per 1905 minutes"),
    ]
    late = 0
    for wait, limit in ladder:
        assert [login(client, "203.0.113.66").status_code for _ in range(2)] == [401, 401]
        assert assert_locked_out(login(client, "203.0.113.66"), limit)["details"]["retry_after"] == wait - late
        clock.advance(wait - late - 1)
        assert_locked_out(login(client, "203.0.113.66"), limit)  # a second early
        clock.advance(2)
        late = 1  # the next burst comes a second after this lock-out ended

    # Past the top rung the waits start again from the bottom, but the top rung holds: however the guesses are
    # spread, one address gets no more than 14 password checks in any 1905 minutes (35 in 32 hours by default).
    checked = []
    # A guess about every five minutes for 64 hours: 301 s, of which no window is a multiple, so that no guess lands
    # on the very edge of a window (where limits' memory store and its Redis store disagree by one).
    for _ in range(64 * 12):
        if login(client, "203.0.113.66").status_code == 401:
            checked.append(clock.now)
        clock.advance(301)
    assert len(checked) > 14
    assert max(sum(1 for t in checked if start <= t < start + 1905 * 60) for start in checked) == 14
    assert login(client, "198.51.100.7", PASSWORD).status_code == 200  # all the while, from elsewhere


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
    of eight guesses sent at once from one address three are checked; the owner elsewhere still signs in."""
    shared = environment | {
        "RATELIMIT_STORAGE_URI": REDIS_URL, "RATELIMIT_KEY_PREFIX": redis_prefix, "TRUSTED_PROXY_COUNT": "1",
        "RATELIMIT_LOGIN_FAILURES": "3 per 15 minutes",
    }  # fmt: skip
    server = servers.start(GUNICORN, shared)
    url = f"{server.url}/api/auth/login"
    together = threading.Barrier(8)

    def guess(n):
        request = urllib.request.Request(
            url, method="POST", data=json.dumps({"username": "admin", "password": f"guess-{n}"}).encode(),
            headers={"Content-Type": "application/json", "X-Forwarded-For": "6.6.6.6, 203.0.113.66"},
        )  # fmt: skip
        together.wait()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(guess, range(8)))
    admin = {"username": "admin", "password": "admin123"}
    locked = call_with_headers("POST", url, admin, headers={"X-Forwarded-For": "203.0.113.66"})
    owner = call_with_headers("POST", url, admin, headers={"X-Forwarded-For": "7.7.7.7, 198.51.100.7"})

    assert sorted(statuses) == [401] * 3 + [429] * 5, statuses
    assert locked[0] == 429 and locked[1]["details"]["limit"] == "3 per 15 minutes", locked
    assert locked[2]["Retry-After"] == str(locked[1]["details"]["retry_after"])
    assert owner[0] == 200, owner
    server.stop()
    assert "Traceback" not in server.log.read_text()
