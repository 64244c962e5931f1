"""Rate limits (Flask-Limiter): a generous default for every route, strict ones where passwords and tokens are
tried. Over a limit the answer is a 429 in the error envelope, with ``Retry-After``."""

import ipaddress
import math
import time
from contextlib import suppress

from flask import Flask, current_app, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from flask_limiter import Limiter
from jwt import PyJWTError
from limits import parse_many

from routes import health, metrics
from routes.errors import APIError

# Seconds to wait for Redis: a slow rate-limit store must not hold requests up (see in_memory_fallback below).
REDIS_TIMEOUT = 2
PASSWORD_ATTEMPTS = "password-attempts"


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


def password_budget(username: str) -> tuple[Limiter | None, list, tuple[str, str, str]]:
    """The limiter (none when limits are off), the limits and the keys of ``username``'s password budget."""
    config = current_app.config
    keys = (config["RATELIMIT_KEY_PREFIX"], f"username:{username}", PASSWORD_ATTEMPTS)
    return current_app.extensions.get("rate_limiter"), parse_many(config["RATELIMIT_LOGIN_FAILURES"]), keys


def spend_password_attempt(username: str) -> None:
    """Count a password check against ``username`` before making it: counted atomically in the store, so
    guesses sent in parallel cannot all slip past the limit. Over it, a 429 with Retry-After.

    Both logins and password changes spend from one budget per username (RATELIMIT_LOGIN_FAILURES);
    a correct password gives the budget back (``forgive_password_attempts``), so only failures add up."""
    limiter, items, keys = password_budget(username)
    if limiter is None:
        return
    try:
        for item in items:
            if not limiter.limiter.hit(item, *keys):
                reset_at = limiter.limiter.get_window_stats(item, *keys).reset_time
                retry_after = max(1, math.ceil(reset_at - time.time()))
                current_app.logger.warning("Password attempts for %r exhausted, from %s", username, client_address())
                raise APIError(
                    "Too many failed password attempts for this account; try again later.",
                    429,
                    {"retry_after": retry_after},
                    headers={"Retry-After": str(retry_after)},
                )
    except APIError:
        raise
    except Exception:  # the store is down: the per-address limits still hold (they fall back to memory)
        current_app.logger.exception("Rate-limit store unreachable: password attempts for %r not counted", username)


def forgive_password_attempts(username: str) -> None:
    """A correct password: the failures counted against the username so far are forgiven."""
    limiter, items, keys = password_budget(username)
    if limiter is None:
        return
    with suppress(Exception):  # best effort: the store being down must not fail a good login
        for item in items:
            limiter.limiter.clear(item, *keys)


def is_preflight() -> bool:
    """CORS preflights carry no credentials and do no work: they never count."""
    return request.method == "OPTIONS"


def init_limiter(app: Flask) -> Limiter:
    """One limiter per app (Flask-Limiter keeps its settings on the instance); limits come from RATELIMIT_*."""
    config = app.config
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
        headers_enabled=True,  # X-RateLimit-* on every response, and Retry-After on a 429
        # Redis down: count in each worker's memory until it is back, rather than fail every request.
        in_memory_fallback_enabled=True,
    )
    if not limiter.enabled:
        return limiter
    app.extensions["rate_limiter"] = limiter  # for the password-attempt budget below
    limiter.exempt(health.bp)  # load balancers poll it; it must never be refused
    limiter.exempt(metrics.bp)  # Prometheus scrapes it on its own schedule

    # Per client address. Failed password checks per username are counted by the views (spend_password_attempt).
    strict = {
        "auth.login": config["RATELIMIT_LOGIN"],
        "auth.register": config["RATELIMIT_REGISTER"],
        "auth.refresh": config["RATELIMIT_REFRESH"],
        "auth.change_password": config["RATELIMIT_LOGIN"],
    }
    for endpoint, limit in strict.items():  # Flask answers OPTIONS itself: preflights never reach these
        app.view_functions[endpoint] = limiter.limit(limit, key_func=address_key)(app.view_functions[endpoint])
    return limiter
