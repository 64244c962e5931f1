"""Rate limits (Flask-Limiter): a generous default for every route, strict ones where passwords and tokens are
tried. Over a limit the answer is a 429 in the error envelope, with ``Retry-After``."""

import ipaddress
import time
from contextlib import suppress
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from flask_limiter import Limiter
from jwt import PyJWTError
from limits import RateLimitItem, RateLimitItemPerSecond, parse, parse_many

from routes import health, metrics
from routes.errors import RateLimited, describe_limit

# Seconds to wait for Redis: a slow rate-limit store must not hold requests up (see in_memory_fallback below).
REDIS_TIMEOUT = 2
PASSWORD_ATTEMPTS = "password-attempts"
SIGNED_IN = "signed-in"
# An address the account signed in from within this window is not held back by the account's ceiling.
KNOWN_ADDRESS = parse("1 per 30 days")
# Each further lock-out of one account at one address doubles, six times: 15 minutes, 30, ... 16 hours by default.
LOCKOUT_DOUBLINGS = 6


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
class Budget:
    """One count of password checks: a rate limit item, the keys it is counted under, and what a 429 says."""

    item: RateLimitItem
    keys: tuple[str, ...]
    message: str


def lockout_ladder(first: RateLimitItem) -> list[RateLimitItem]:
    """``first`` (N failures per W) and the rungs above it, kN per W(2^k - 1): N failures in a burst lock out for W,
    the next N for 2W, the next for 4W, and so on up to 2^LOCKOUT_DOUBLINGS W. Moving windows (exact counts,
    atomic in the store) make the ladder: the k-th burst waits until the first falls out of the k-th rung."""
    window = first.get_expiry()
    return [
        RateLimitItemPerSecond(first.amount * k, window * (2**k - 1), namespace=first.namespace)
        for k in range(1, LOCKOUT_DOUBLINGS + 2)
    ]


def pair_keys(username: str, address: str, kind: str = PASSWORD_ATTEMPTS) -> tuple[str, ...]:
    return (current_app.config["RATELIMIT_KEY_PREFIX"], f"username:{username}", f"address:{address}", kind)


def password_budgets(limiter: Limiter, username: str, address: str) -> list[Budget]:
    """What a password check for ``username`` from ``address`` spends: the pair's ladder, and, unless the account
    has signed in from this address lately, the account's ceiling across all addresses."""
    config = current_app.config
    pair = pair_keys(username, address)
    here = "Too many failed password attempts for this account from your address; try again later."
    budgets = [
        Budget(rung, pair, here)
        for item in parse_many(config["RATELIMIT_LOGIN_FAILURES"])
        for rung in lockout_ladder(item)
    ]
    if limiter.limiter.test(KNOWN_ADDRESS, *pair_keys(username, address, SIGNED_IN)):
        account = (config["RATELIMIT_KEY_PREFIX"], f"username:{username}", PASSWORD_ATTEMPTS)
        anywhere = "Too many failed password attempts for this account; try again later."
        budgets += [Budget(item, account, anywhere) for item in parse_many(config["RATELIMIT_LOGIN_FAILURES_ACCOUNT"])]
    return budgets


def spend_password_attempt(username: str) -> None:
    """Count a password check against ``username`` from this client's address before making it: counted
    atomically in the store, so guesses sent in parallel cannot all slip past the limits. Over one, a 429.

    Two counts (see ``password_budgets``): per account and address (RATELIMIT_LOGIN_FAILURES, with lock-outs
    that double), so that someone guessing from one address does not keep the owner out elsewhere; and per
    account across addresses (RATELIMIT_LOGIN_FAILURES_ACCOUNT), much higher, against guessing from many.
    Logins and password changes spend alike; a correct password gives the pair's count back."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    address = address_key()
    try:
        budgets = password_budgets(limiter, username, address)
        # Look first, so that a refused check spends nothing; then take, each count atomically (a race lost here
        # still refuses, and what it took from the other counts errs against the guesser).
        refused = [budget for budget in budgets if not limiter.limiter.test(budget.item, *budget.keys)]
        if not refused:
            refused = [budget for budget in budgets if not limiter.limiter.hit(budget.item, *budget.keys)]
        waits = [(limiter.limiter.get_window_stats(b.item, *b.keys).reset_time - time.time(), b) for b in refused]
    except Exception:  # the store is down: the per-address limits still hold (they fall back to memory)
        current_app.logger.exception("Rate-limit store unreachable: password attempts for %r not counted", username)
        return
    if waits:
        wait, budget = max(waits, key=lambda pair: pair[0])
        current_app.logger.warning(
            "Password attempts for %r exhausted (%s), from %s", username, describe_limit(budget.item), client_address()
        )
        raise RateLimited(budget.message, wait, describe_limit(budget.item))


def forgive_password_attempts(username: str) -> None:
    """A correct password: this address's failures for ``username`` are forgiven, and for KNOWN_ADDRESS the
    account's ceiling no longer holds it back. The account's count stays: the owner signing in must not wipe
    out what guessers elsewhere have spent."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None:
        return
    address = address_key()
    with suppress(Exception):  # best effort: the store being down must not fail a good login
        for item in parse_many(current_app.config["RATELIMIT_LOGIN_FAILURES"]):
            for rung in lockout_ladder(item):
                limiter.limiter.clear(rung, *pair_keys(username, address))
        known = pair_keys(username, address, SIGNED_IN)
        limiter.limiter.clear(KNOWN_ADDRESS, *known)  # a fresh 30 days from this sign-in
        limiter.limiter.hit(KNOWN_ADDRESS, *known)


def retry_after_only_when_due(response: Response) -> Response:
    """Retry-After belongs on a 429 or a 503 (Flask-Limiter adds it to every response it counts), and on a 429
    it says what the body's ``details.retry_after`` says (Flask-Limiter rounds its own figure down, to 0 at worst).
    """
    if response.status_code == 429 and g.get("retry_after"):
        response.headers["Retry-After"] = g.retry_after
    elif response.status_code not in (429, 503):
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
    limiter = Limiter(
        caller,
        app=app,
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
    app.extensions["rate_limiter"] = limiter  # for the password-attempt budget below
    limiter.exempt(health.bp)  # load balancers poll it; it must never be refused
    limiter.exempt(metrics.bp)  # Prometheus scrapes it on its own schedule

    # Per client address. Password checks per account are counted by the views (spend_password_attempt).
    strict = {
        "auth.login": config["RATELIMIT_LOGIN"],
        "auth.register": config["RATELIMIT_REGISTER"],
        "auth.refresh": config["RATELIMIT_REFRESH"],
        "auth.change_password": config["RATELIMIT_LOGIN"],
    }
    for endpoint, limit in strict.items():  # Flask answers OPTIONS itself: preflights never reach these
        app.view_functions[endpoint] = limiter.limit(limit, key_func=address_key)(app.view_functions[endpoint])
    return limiter
