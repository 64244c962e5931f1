"""Rate limits (Flask-Limiter): a generous default for every route, strict ones where passwords and tokens are
tried. Over a limit the answer is a 429 in the error envelope, with ``Retry-After``."""

import hashlib
import ipaddress
import secrets
import time
from contextlib import suppress
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from flask_limiter import Limiter
from jwt import PyJWTError
from limits import RateLimitItem, RateLimitItemPerSecond, parse_many
from limits.storage import MovingWindowSupport, RedisStorage

from routes import health, metrics
from routes.errors import RateLimited, describe_limit

# Seconds to wait for Redis: a slow rate-limit store must not hold requests up (see in_memory_fallback below).
REDIS_TIMEOUT = 2
PASSWORD_ATTEMPTS = "password-attempts"
SIGNED_IN = "signed-in"
PASSWORD_CHANGED = "password-changed"
# An address the account signed in from within this many seconds is not held back by the account's ceiling; a
# sign-in there renews it, at most once a day.
KNOWN_FOR = 30 * 24 * 3600
KNOWN_REFRESHED_AFTER = 24 * 3600
# Each further lock-out in a row of one account at one address doubles, six times: 15 minutes, 30, ... 16 hours by
# default; and none lasts over a day (unless RATELIMIT_LOGIN_FAILURES's window is longer).
LOCKOUT_DOUBLINGS = 6
LONGEST_LOCKOUT = 24 * 3600
HERE = "Too many failed password attempts for this account from your address; try again later."
ANYWHERE = "Too many failed password attempts for this account; try again later."
TOO_MANY_EMAILS = "Too many emails to this address lately; try again later."


# Adds ``amount`` entries to a moving window (as limits' own script does: none if that would pass ``limit``), then
# answers the window as limits' get_moving_window does: the oldest entry still inside it, and how many are; and, in
# the same round trip, the accounts' epoch (KEYS[2], see routes/auth.py's AuthCache).
ACQUIRE_AND_COUNT = """
local timestamp, limit, expiry, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local since = timestamp - expiry
local acquired = 0
if amount <= limit then
    local entry = redis.call('lindex', KEYS[1], limit - amount)
    if not (entry and tonumber(entry) >= since) then
        for _ = 1, amount do redis.call('lpush', KEYS[1], timestamp) end
        redis.call('ltrim', KEYS[1], 0, limit - 1)
        redis.call('expire', KEYS[1], expiry)
        acquired = 1
    end
end
local low, high, found = 0, redis.call('llen', KEYS[1]) - 1, nil
while low <= high do
    local middle = math.floor((low + high) / 2)
    if tonumber(redis.call('lindex', KEYS[1], middle)) >= since then
        found, low = middle, middle + 1
    else
        high = middle - 1
    end
end
local epoch = redis.call('get', KEYS[2])
if found == nil then return {acquired, tostring(timestamp), 0, epoch} end
return {acquired, redis.call('lindex', KEYS[1], found), found + 1, epoch}
"""


class CountingRedisStorage(RedisStorage):
    """limits' Redis storage, answering a moving window's state from the round trip that just counted a request in
    it. Flask-Limiter asks for that state after each hit, for the X-RateLimit-* headers: without this, a second
    round trip to Redis on every request. The same round trip reads the accounts' epoch, kept under
    ``epoch_key`` (see routes/auth.py's AuthCache). ``init_limiter`` names it by the scheme ``counting+redis``."""

    STORAGE_SCHEME = ["counting+redis", "counting+rediss"]

    def __init__(self, uri: str, **options):
        super().__init__(uri.removeprefix("counting+"), **options)
        self.lua_acquire_and_count = self.get_connection().register_script(ACQUIRE_AND_COUNT)
        self.epoch_key = "accounts-epoch"  # init_limiter puts it under the app's RATELIMIT_KEY_PREFIX

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        arguments = [time.time(), limit, expiry, amount]
        keys = [self.prefixed_key(key), self.prefixed_key(self.epoch_key)]
        acquired, oldest, count, epoch = self.lua_acquire_and_count(keys, arguments)
        if has_request_context():
            g.setdefault("moving_windows", {})[key, limit, expiry] = (float(oldest), int(count))
            g.setdefault("accounts_epoch", epoch)  # token_owner takes the one read before it reads the database
        return bool(acquired)

    def start_accounts_epoch(self, missing: bool = False) -> None:
        """A new epoch: a fresh random value, never one an earlier epoch had (or, when ``missing``, only if there
        is none, say after Redis lost its data)."""
        self.get_connection().set(self.prefixed_key(self.epoch_key), secrets.token_hex(16), nx=missing)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        if has_request_context() and (window := g.get("moving_windows", {}).pop((key, limit, expiry), None)):
            return window
        return super().get_moving_window(key, limit, expiry)

    def clear(self, key: str) -> None:
        if has_request_context():
            for kept in [kept for kept in g.get("moving_windows", {}) if kept[0] == key]:
                del g.moving_windows[kept]
        super().clear(key)


def client_address() -> str:
    """The caller's address: the connection's, or X-Forwarded-For's as far as ProxyFix trusts it."""
    return request.remote_addr or "unknown"


def address_key() -> str:
    """The address limits count by. An IPv6 client counts per /64, the block one customer is usually given,
    so walking through its own addresses gains nothing."""
    address = client_address()
    with suppress(ValueError):
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def caller() -> str:
    """Signed-in callers count per account (an office shares one address); anyone else per address."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        with suppress(PyJWTError, JWTExtendedException, KeyError):
            return f"user:{decode_token(token)['sub']}"
    return f"address:{address_key()}"


@dataclass(frozen=True)
class Refusal:
    """A password check held back: what the 429 says, and for how long."""

    message: str
    wait: float
    limit: str


def password_key(username: str, *parts: object) -> str:
    """A key of ``username``'s password budgets in the store, under RATELIMIT_KEY_PREFIX."""
    prefix = current_app.config["RATELIMIT_KEY_PREFIX"]
    return "/".join(str(part) for part in (prefix, "password", f"username:{username}", *parts))


def lockout(item: RateLimitItem, strikes: int) -> int:
    """Seconds that the ``strikes``-th lock-out in a row of one address lasts, for ``item`` (N failures per W): W,
    then twice as long each time, at most 2^LOCKOUT_DOUBLINGS W and a day (or W, if that is longer)."""
    window = item.get_expiry()
    return min(window * 2 ** min(max(strikes, 1) - 1, LOCKOUT_DOUBLINGS), max(window, LONGEST_LOCKOUT))


def per(amount: int, seconds: int) -> str:
    return describe_limit(RateLimitItemPerSecond(amount, seconds))


def spend_at_address(store: MovingWindowSupport, item: RateLimitItem, username: str, address: str) -> Refusal | None:
    """Spend one of ``item``'s checks of ``username`` at ``address``, unless that pair is locked out.

    Two keys, both moving windows of timestamps that this process writes: the failures (N per W), and the lock-out,
    which holds k copies of the time the k-th lock-out in a row began, so that one read says when it began and how
    long it lasts. The run of lock-outs is forgotten twice the longest lock-out after the last one began."""
    failures = password_key(username, f"address:{address}", "failures", item.amount, item.get_expiry())
    locked = password_key(username, f"address:{address}", "lock-out", item.amount, item.get_expiry())
    most = LOCKOUT_DOUBLINGS + 1
    remembered = 2 * lockout(item, most)
    began, strikes = store.get_moving_window(locked, most, remembered)
    if strikes:
        g.setdefault("locked_out_before", set()).add(username)
        if time.time() < began + lockout(item, strikes):
            return Refusal(HERE, began + lockout(item, strikes) - time.time(), per(item.amount, lockout(item, strikes)))
    accepted = store.acquire_entry(failures, item.amount, item.get_expiry())
    oldest, count = store.get_moving_window(failures, item.amount, item.get_expiry())
    if not accepted:  # sent together with the one that filled the window: the lock-out is being written
        return Refusal(HERE, oldest + item.get_expiry() - time.time(), describe_limit(item))
    if count >= item.amount:  # this check fills the window: a lock-out from now, longer than the last one
        g.setdefault("locked_out_before", set()).add(username)
        strikes = min(strikes + 1, most)
        store.clear(locked)
        # As many as it holds: when checks sent together each see the window filled, only the first one's goes in.
        store.acquire_entry(locked, strikes, remembered, amount=strikes)
    return None


def signed_in_here_lately(store: MovingWindowSupport, username: str, address: str) -> float | None:
    """When ``username`` last signed in from ``address``, if within KNOWN_FOR and not before the account's
    password last changed (``forget_known_addresses``); otherwise None."""
    signed_in, marks = store.get_moving_window(password_key(username, f"address:{address}", SIGNED_IN), 1, KNOWN_FOR)
    if not marks:
        return None
    changed, changes = store.get_moving_window(password_key(username, PASSWORD_CHANGED), 1, KNOWN_FOR)
    return signed_in if not changes or signed_in >= changed else None


def spend(limiter: Limiter, limits: str, message: str, *keys: str) -> Refusal | None:
    """Spend one hit of each limit of ``limits`` (a RATELIMIT_* setting) under ``keys``, in turn, stopping at the
    first that refuses: that refusal, with ``message``, or None."""
    for item in parse_many(limits):
        if not limiter.limiter.hit(item, *keys):
            reset = limiter.limiter.get_window_stats(item, *keys).reset_time
            return Refusal(message, reset - time.time(), describe_limit(item))
    return None


def spend_at_account(limiter: Limiter, username: str) -> Refusal | None:
    """Spend one check from ``username``'s ceiling across addresses (RATELIMIT_LOGIN_FAILURES_ACCOUNT)."""
    config = current_app.config
    keys = (config["RATELIMIT_KEY_PREFIX"], f"username:{username}", PASSWORD_ATTEMPTS)
    return spend(limiter, config["RATELIMIT_LOGIN_FAILURES_ACCOUNT"], ANYWHERE, *keys)


def spend_email_to(address: str) -> None:
    """Count one email to ``address`` against RATELIMIT_ACCOUNT_EMAIL; over it, a 429. Whoever asks, and whether or
    not an account uses the address: it keeps the app from flooding one inbox, and answers the same for every
    address. The address is kept in the store as its hash only. While the store fails, the email goes."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    config = current_app.config
    keys = (config["RATELIMIT_KEY_PREFIX"], "account-email", hashlib.sha256(address.encode()).hexdigest())
    try:
        refusal = spend(limiter, config["RATELIMIT_ACCOUNT_EMAIL"], TOO_MANY_EMAILS, *keys)
    except Exception:
        current_app.logger.exception("Rate-limit store failed: an account email not counted")
        return
    if refusal is not None:
        raise RateLimited(refusal.message, refusal.wait, refusal.limit)


def spend_password_attempt(username: str) -> None:
    """Count a password check against ``username`` from this client's address before making it. Over a limit, a 429.

    Two counts. Per account and address (RATELIMIT_LOGIN_FAILURES): N failures within W lock the account out at
    that address only, for W, and each further lock-out in a row lasts twice as long (``spend_at_address``), so that
    someone guessing at one address does not keep the owner out at another. Then, only for a check that count let
    through and only from an address the account has not signed in from lately, the account's ceiling across
    addresses (RATELIMIT_LOGIN_FAILURES_ACCOUNT), against guessing from many. Each count is atomic in the store, so
    guesses sent together cannot slip past it, and a refused guess spends nothing after the count that refused it.
    Logins and password changes spend alike; a correct password forgives that address (``forgive_...``).

    While Redis is out of reach, Flask-Limiter counts in each worker's memory, and so do these: per worker, and
    without the addresses known before the outage."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    address = address_key()
    try:
        store = limiter.limiter.storage
        refusal = None
        for item in parse_many(current_app.config["RATELIMIT_LOGIN_FAILURES"]):
            refusal = refusal or spend_at_address(store, item, username, address)
        if refusal is None:
            known = signed_in_here_lately(store, username, address)
            g.setdefault("signed_in_here", {})[username] = known
            if known is None:
                refusal = spend_at_account(limiter, username)
    except Exception:  # the store failed just now: let this check through rather than refuse every login
        current_app.logger.exception("Rate-limit store failed: password check of %r not counted", username)
        return
    if refusal is not None:
        current_app.logger.warning(
            "Password checks of %r held back (%s), from %s", username, refusal.limit, client_address()
        )
        raise RateLimited(refusal.message, refusal.wait, refusal.limit)


def forgive_password_attempts(username: str) -> None:
    """A correct password: this address's failures and lock-outs for ``username`` are forgiven, and for KNOWN_FOR
    the account's ceiling no longer holds the address back. The account's count stays: the owner signing in must
    not wipe out what guessers elsewhere have spent."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    address = address_key()
    with suppress(Exception):  # best effort: the store being down must not fail a good login
        store = limiter.limiter.storage
        for item in parse_many(current_app.config["RATELIMIT_LOGIN_FAILURES"]):
            store.clear(password_key(username, f"address:{address}", "failures", item.amount, item.get_expiry()))
            if username in g.get("locked_out_before", ()):
                store.clear(password_key(username, f"address:{address}", "lock-out", item.amount, item.get_expiry()))
        known = g.get("signed_in_here", {}).get(username)
        if known is None or known < time.time() - KNOWN_REFRESHED_AFTER:  # a fresh KNOWN_FOR from this sign-in
            mark(store, password_key(username, f"address:{address}", SIGNED_IN))


def forget_known_addresses(username: str) -> None:
    """The password of ``username`` has changed: no address it signed in from so far is spared the account's
    ceiling any more (the one that signs in next is, as ever)."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    with suppress(Exception):  # best effort, as forgiving is
        mark(limiter.limiter.storage, password_key(username, PASSWORD_CHANGED))


def mark(store: MovingWindowSupport, key: str) -> None:
    """Note the time now under ``key``, in place of the last time noted there (kept for KNOWN_FOR)."""
    store.clear(key)
    store.acquire_entry(key, 1, KNOWN_FOR)


def retry_after_only_when_due(response: Response) -> Response:
    """Retry-After belongs on a 429 or a 503 only (Flask-Limiter adds its own to every response it counts), and
    says what the error handler chose: on a 429 the body's ``details.retry_after`` (Flask-Limiter rounds its own
    figure down, to 0 at worst), on a 503 a few seconds (not the rate limit's window)."""
    chosen = g.get("retry_after")
    if response.status_code in (429, 503) and chosen:
        response.headers["Retry-After"] = chosen
    elif response.status_code != 429:
        response.headers.pop("Retry-After", None)
    return response


def is_preflight() -> bool:
    """CORS preflights carry no credentials and do no work: they never count."""
    return request.method == "OPTIONS"


def init_limiter(app: Flask) -> Limiter:
    """One limiter per app (Flask-Limiter keeps its settings on the instance); limits come from RATELIMIT_*."""
    config = app.config
    app.after_request(retry_after_only_when_due)  # before the limiter's own hook, so that this one runs after it
    storage_uri = config["RATELIMIT_STORAGE_URI"] or "memory://"
    config["RATELIMIT_STORAGE_URI"] = storage_uri
    if storage_uri.startswith(("redis://", "rediss://", "redis+")):
        config.setdefault(
            "RATELIMIT_STORAGE_OPTIONS", {"socket_connect_timeout": REDIS_TIMEOUT, "socket_timeout": REDIS_TIMEOUT}
        )
    if storage_uri.startswith(("redis://", "rediss://")):
        storage_uri = f"counting+{storage_uri}"  # one round trip per request: see CountingRedisStorage
    limiter = Limiter(
        caller,
        app=app,
        storage_uri=storage_uri,
        default_limits=[config["RATELIMIT_DEFAULT"]],
        default_limits_exempt_when=is_preflight,
        strategy="moving-window",  # exact counts: no double burst at the edge of a window
        key_prefix=config["RATELIMIT_KEY_PREFIX"],
        headers_enabled=True,  # X-RateLimit-* on every response it counts
        # Redis down: count in each worker's memory until it is back, rather than fail every request.
        in_memory_fallback_enabled=True,
    )
    if not limiter.enabled:
        return limiter
    if isinstance(limiter.storage, CountingRedisStorage):
        limiter.storage.epoch_key = f"{config['RATELIMIT_KEY_PREFIX']}/accounts-epoch"
    app.extensions["rate_limiter"] = limiter  # for the password-attempt budget below
    limiter.exempt(health.bp)  # load balancers poll it; it must never be refused
    limiter.exempt(metrics.bp)  # Prometheus scrapes it on its own schedule

    # Per client address. Password checks per account are counted by the views (spend_password_attempt).
    strict = {
        "auth.login": config["RATELIMIT_LOGIN"],
        "auth.register": config["RATELIMIT_REGISTER"],
        "auth.refresh": config["RATELIMIT_REFRESH"],
        "auth.change_password": config["RATELIMIT_LOGIN"],
        "accounts.forgot_password": config["RATELIMIT_LOGIN"],
        "accounts.reset_password": config["RATELIMIT_LOGIN"],
        "accounts.request_email_change": config["RATELIMIT_LOGIN"],
        "accounts.confirm_email_change": config["RATELIMIT_LOGIN"],
        "auth.verify_email": config["RATELIMIT_REGISTER"],
        "auth.resend_verification": config["RATELIMIT_REGISTER"],
        "invitations.accept_invitation": config["RATELIMIT_REGISTER"],
    }
    for endpoint, limit in strict.items():  # Flask answers OPTIONS itself: preflights never reach these
        app.view_functions[endpoint] = limiter.limit(limit, key_func=address_key)(app.view_functions[endpoint])
    return limiter
