"""Settings, read once from the environment (``.env`` is honoured by ``app.py``, gunicorn and ``flask``)."""

import importlib.resources
import os
import re
import secrets
import select
import ssl
import time
from collections.abc import Mapping
from datetime import timedelta
from functools import cache
from pathlib import Path
from weakref import WeakSet

from filelock import FileLock
from flask import has_request_context, request
from flask_sqlalchemy.session import Session as FlaskSQLAlchemySession
from limits import parse_many
from psycopg2.extensions import STATUS_READY
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError
from werkzeug.security import generate_password_hash

VERSION = "1.0.0"

DEFAULT_CORS_ORIGINS = "http://localhost:4200,http://127.0.0.1:4200"
DEFAULT_FRONTEND_URL = "http://localhost:4200"  # `ng serve`
DEFAULT_ADMIN_PASSWORD = "admin123"  # development only, documented, and warned about when used
MIN_SECRET_BYTES = 32
SECRET_NAMES = ("SECRET_KEY", "JWT_SECRET_KEY")
# Values that appear in documentation, tutorials and this project's own files: never secret in production.
WELL_KNOWN_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "secret", "secret-key", "dev", "development", "test", "password"}
)
WELL_KNOWN_SECRET_WORDS = ("change-me", "changeme", "change_me", "replace-me", "your-secret", "example", "test-")
MIN_PASSWORD_LENGTH, MAX_PASSWORD_LENGTH = 8, 128
# Passwords that this project's own files, tutorials and default-password lists publish, beside the 30,000 most common
# leaked passwords that zxcvbn ships (well_known_passwords): refused in production for every account, also with
# digits or symbols around them ("password123", "Admin@2024!") and in leetspeak ("P@$$w0rd").
WELL_KNOWN_PASSWORDS = frozenset(
    {DEFAULT_ADMIN_PASSWORD, "demo-password", "finstack", "admin", "administrator", "root", "guest", "user", "login",
     "password", "changeme", "change-me", "change_me", "letmein", "qwerty", "abc", "abcdef", "87654321", "0987654321"}
)  # fmt: skip
# Leetspeak undone: "p@$$w0rd" -> "password"; "1" is read both as "l" and as "i" ("adm1n").
LEETSPEAK = (str.maketrans("@$013457", "asoleast"), str.maketrans("@$013457", "asoieast"))
# Werkzeug method for new password hashes: OWASP's PBKDF2-HMAC-SHA256 minimum. Measured here per login:
# 144 ms and no extra memory, where scrypt N=2^17 takes 377 ms and 128 MiB (README, "Password storage").
DEFAULT_PASSWORD_HASH_METHOD = "pbkdf2:sha256:600000"
# OWASP password-storage minimums: PBKDF2 iterations per digest, and scrypt (N, p) pairs with r >= 8.
OWASP_PBKDF2_ITERATIONS = {"sha256": 600_000, "sha512": 210_000, "sha1": 1_300_000}
OWASP_SCRYPT_N_P = ((2**17, 1), (2**16, 2), (2**15, 3), (2**14, 5), (2**13, 10))
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
MAIL_BACKENDS = ("file", "smtp", "disabled")
# How the SMTP connection is protected, and the port each way uses unless MAIL_PORT says otherwise.
MAIL_SECURITY_PORTS = {"starttls": 587, "tls": 465, "none": 25}
MAIL_ADDRESS = re.compile(r"[^@\s<>\"(),;:]+@[^@\s<>\"(),;:]+")
APP_ENVS = ("development", "production")
# Who may create an account with POST /api/auth/register: anyone, addresses of ALLOWED_EMAIL_DOMAINS once verified,
# only people an administrator invited (POST /api/invitations), or no one. Administrators always can (POST /api/users).
REGISTRATION_MODES = ("open", "domain", "invite", "closed")
DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
# An exact origin: scheme and host (and port), no path and nothing Flask-CORS would read as a pattern.
ORIGIN = re.compile(
    r"[a-z][a-z0-9+.-]*://[A-Za-z0-9.-]+(:[0-9]{1,5})?|[a-z][a-z0-9+.-]*://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)

FRONTEND_URL = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")


class ConfigError(RuntimeError):
    """The environment cannot run the app; the message says what to change."""


def normalise_database_url(url: str) -> str:
    """Point PostgreSQL URLs at psycopg2 (SQLAlchemy 2.1 would pick psycopg 3; Render says postgres://)."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    return url


def checked_database_url(url: str) -> str:
    """The normalised URL, or a clear error for anything that is not SQLite or PostgreSQL."""
    url = normalise_database_url(url)
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        backend = None
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError("DATABASE_URL must be a sqlite:///... or postgres(ql)://... URL.")
    return url


def engine_options(
    url: str, pool_size: int = 5, max_overflow: int = 0, connect_timeout: int = 5, statement_timeout: int = 10_000
) -> dict:
    """Connection settings on PostgreSQL: sessions in UTC whatever the server's default (timestamps near year 1
    or 9999 only exist in UTC), a pool per process of at most ``pool_size + max_overflow`` connections (checked
    before use when idle a while: ``ping_idle_connections``), and every wait bounded so that a database that goes
    away makes requests answer 503 promptly instead of hanging: the connect (``connect_timeout`` s), each
    statement (``statement_timeout`` ms, 0 for none), a connection lost without a word (TCP keepalives;
    unacknowledged data for 10 s) and the wait for a pooled connection. Statement parameters never appear in
    errors or logs (they may hold personal data)."""
    if not url.startswith("postgresql"):
        return {"hide_parameters": True}
    return {
        "hide_parameters": True,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": 10,
        "connect_args": {
            "connect_timeout": connect_timeout,
            # No JIT: it compiles for 25 to 45 ms any plan estimated above jit_above_cost (a filtered dashboard's),
            # to save less than that on queries that read from indexes.
            "options": f"-c timezone=UTC -c statement_timeout={statement_timeout} -c jit=off",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        },
    }


# A pooled connection idle this long is checked with a round trip before use; see ping_idle_connections.
PING_IDLE_AFTER = 10.0


def ping_idle_connections(engine: Engine) -> None:
    """Check a pooled connection before use only when it has been idle ``PING_IDLE_AFTER`` seconds, not on every
    checkout as SQLAlchemy's pool_pre_ping does (a round trip per request). A dead one is replaced before the
    request uses it. One used more recently is trusted: if the database went away meanwhile, that request answers
    503 and SQLAlchemy drops every connection made before the failure, so the next request connects afresh."""

    @event.listens_for(engine, "checkin")
    def idle_from_now(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def ping_if_idle(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_AFTER:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise DisconnectionError(str(error)) from error  # the pool connects again, and checks out that
            raise


def reads_without_transactions(engine: Engine) -> None:
    """On PostgreSQL, a GET or HEAD request's statements run in autocommit: no BEGIN before them and no ROLLBACK
    after, two round trips of the request's few. Every such request only reads (writes are POST, PUT, PATCH and
    DELETE), and each of its statements sees a consistent snapshot of its own, which is all a read needs where
    one statement answers it (the task list brings its total in its page's statement).

    psycopg2 sends BEGIN only before a transaction's first statement, so a connection of ``engine`` is switched to
    autocommit when an app session's transaction begins on it (nothing sent yet), and back when it returns to the
    pool, before anyone else can use it. Other engines' connections, and other sessions (the PostgreSQL tests'
    session inside a transaction of their own), are left alone."""
    if engine.dialect.name != "postgresql":
        return
    AUTOCOMMIT_ENGINES.add(engine)

    @event.listens_for(engine, "checkin")
    def transactions_again(dbapi_connection, record) -> None:
        if dbapi_connection is None or not dbapi_connection.autocommit:
            return
        try:
            dbapi_connection.autocommit = False
        except dbapi_connection.Error:  # closed under it: the pool connects afresh next time
            record.invalidate()

    if not event.contains(FlaskSQLAlchemySession, "after_begin", autocommit_reads):
        event.listen(FlaskSQLAlchemySession, "after_begin", autocommit_reads)


# Engines whose connections are switched back to transactions at checkin: only theirs are switched to autocommit.
AUTOCOMMIT_ENGINES: WeakSet[Engine] = WeakSet()


def autocommit_reads(_session, _transaction, connection) -> None:
    """``after_begin`` of the app's sessions: the switch described in ``reads_without_transactions``."""
    reading = has_request_context() and request.method in ("GET", "HEAD")
    if not reading or connection.engine not in AUTOCOMMIT_ENGINES:
        return
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection.status == STATUS_READY:
        dbapi_connection.autocommit = True


def limit_postgresql_waits(connect_timeout: int, statement_timeout: int) -> None:
    """Bound every wait of psycopg2 on PostgreSQL in this process, also for a server that answers nothing at all:
    behind a hung server or a stuck proxy TCP still acknowledges, keepalives succeed, and libpq would wait for
    ever. A connect gets ``connect_timeout`` s; an answer the statement timeout (``statement_timeout`` ms, which
    the server enforces first) and 2 s more. For the server's workers (gunicorn.conf.py): with a wait callback
    psycopg2 drives libpq asynchronously, and COPY (`flask seed-demo`) is not available that way."""
    import psycopg2
    from psycopg2 import extensions

    answer_within = statement_timeout / 1000 + 2 if statement_timeout else None
    connected = (extensions.STATUS_READY, extensions.STATUS_BEGIN, extensions.STATUS_PREPARED)

    def wait(connection) -> None:
        limit = answer_within if connection.status in connected else connect_timeout
        deadline = None if limit is None else time.monotonic() + limit
        while (state := connection.poll()) != extensions.POLL_OK:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                # Worded as libpq words a lost line, so that SQLAlchemy drops the connection instead of waiting
                # again for a ROLLBACK on it.
                raise psycopg2.OperationalError(f"could not receive data from server: no answer in {limit:g} s")
            waiting = select.poll()  # not select(): descriptors past 1024 are common under gthread workers
            waiting.register(connection.fileno(), select.POLLIN if state == extensions.POLL_READ else select.POLLOUT)
            waiting.poll(None if remaining is None else remaining * 1000)

    extensions.set_wait_callback(wait)


def parse_port(name: str, value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit() and 0 < int(value) < 65536):
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {value!r}.")
    return int(value)


@cache  # learnt by hashing once, which takes as long as a login: once per process is enough
def checked_hash_method(method: str) -> str:
    """The method in Werkzeug's full form ("scrypt" -> "scrypt:32768:8:1"), which stored hashes begin with."""
    try:
        return generate_password_hash("probe", method=method).partition("$")[0]
    except ValueError as error:
        raise ConfigError(f"PASSWORD_HASH_METHOD {method!r} is not a Werkzeug hash method: {error}") from None


def meets_owasp_minimum(method: str) -> bool:
    """Is a full Werkzeug method ("pbkdf2:sha256:600000", "scrypt:131072:8:1") at or above OWASP's minimums?"""
    name, *params = method.split(":")
    if name == "pbkdf2" and len(params) == 2 and params[1].isdigit():
        return int(params[1]) >= OWASP_PBKDF2_ITERATIONS.get(params[0], float("inf"))
    if name == "scrypt" and len(params) == 3 and all(param.isdigit() for param in params):
        n, r, p = map(int, params)
        return r >= 8 and any(n >= min_n and p >= min_p for min_n, min_p in OWASP_SCRYPT_N_P)
    return False


def parse_limits(name: str, value: str) -> str:
    """A Flask-Limiter rate limit string such as "10 per minute" or "5 per 15 minutes; 100 per day"."""
    try:
        if parse_many(value):
            return value
    except ValueError:
        pass
    raise ConfigError(f"{name} must be a rate limit such as '10 per minute', not {value!r}.")


def parse_count(name: str, value: str | None, default: int, low: int = 0, high: int = 10) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {value!r}.")
    return int(value)


def parse_seconds(name: str, value: str | None, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None or not (0 < seconds < float("inf")):
        raise ConfigError(f"{name} must be a positive number of seconds such as 10 or 2.5, not {value!r}.")
    return seconds


def checked_ca_file(path: str | None) -> str | None:
    """MAIL_CA_FILE, loaded once now so that a wrong path or a file of no certificates stops the start, not a send."""
    if path is None:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"MAIL_CA_FILE must be a PEM file of CA certificates (or unset, for the system's): {path!r}: {error}"
        ) from None
    return path


def parse_origins(value: str) -> list[str]:
    origins = [origin.strip() for origin in value.split(",") if origin.strip()]
    for origin in origins:
        if "*" in origin:
            raise ConfigError(
                f"CORS_ORIGIN must not contain a wildcard ({origin!r}): list each allowed origin exactly, "
                "such as https://tasks.example.com."
            )
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(f"CORS_ORIGIN must list exact origins such as https://tasks.example.com, not {origin!r}.")
    return origins


def checked_broker_url(url: str | None) -> str | None:
    """CELERY_BROKER_URL: Redis (redis://, rediss:// for TLS), or unset for the embedded runner."""
    if url is not None and not url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            "CELERY_BROKER_URL must be a Redis URL such as redis://localhost:6379/1 (rediss:// with TLS), or unset to "
            "run jobs inside the app's own process (development)."
        )
    return url


def celery_settings(broker_url: str | None, queue: str) -> dict:
    """Celery's settings (jobs.celery_init_app). A task is acknowledged once it has run, one at a time per worker
    process, so a worker that dies mid-send leaves its task to be delivered again; the outbox's claim makes a
    second delivery harmless, and the sweep covers a task the broker lost. No results are kept: the outbox row is
    the result. The workers log through the app's own logging (jobs.app_logging_only)."""
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        # A request's commit hands messages to the broker: with the broker away, it gives up at once (one retry)
        # rather than keep the request waiting, as the sweep sends them later. Workers reconnect on their own terms.
        "broker_transport_options": {
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
        },
        "task_default_queue": queue,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "timezone": "UTC",
    }


@cache
def time_zones() -> frozenset[str]:
    """The IANA time zone names of the pinned tzdata package: the same on every machine (zoneinfo's own list adds
    what the system has, such as "localtime": whichever zone that server is set to)."""
    return frozenset(importlib.resources.files("tzdata").joinpath("zones").read_text().split())


def parse_time_zone(value: str) -> str:
    """DEFAULT_TIME_ZONE: an IANA time zone name, exactly as the database spells it."""
    if value not in time_zones():
        raise ConfigError(
            f"DEFAULT_TIME_ZONE must be an IANA time zone name such as Europe/London or America/New_York, not "
            f"{value!r}."
        )
    return value


def parse_frontend_url(value: str | None) -> str | None:
    """FRONTEND_URL: an http(s) URL without query or fragment, kept without its trailing slash."""
    if value is None:
        return None
    url = value.strip().rstrip("/")
    if not FRONTEND_URL.fullmatch(url):
        raise ConfigError(
            f"FRONTEND_URL must be the web app's address, such as https://tasks.example.com (a path may follow; no "
            f"query), not {value!r}."
        )
    return url


def parse_flag(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}.")


def app_environment(app_env: str | None, flask_env: str | None) -> str:
    """development or production, from APP_ENV or else FLASK_ENV (Flask's old name, which older guides and the
    seed README tell Render users to set). Both set to different values is refused: either may be the mistake."""
    for name, value in (("APP_ENV", app_env), ("FLASK_ENV", flask_env)):
        if value is not None and value not in APP_ENVS:
            raise ConfigError(f"{name} must be {' or '.join(APP_ENVS)}, not {value!r}.")
    if app_env and flask_env and app_env != flask_env:
        raise ConfigError(
            f"APP_ENV={app_env} and FLASK_ENV={flask_env} disagree: set APP_ENV only (FLASK_ENV is its old name), "
            "or both to the same value."
        )
    return app_env or flask_env or "development"


def parse_debug(value: str | None) -> bool:
    """FLASK_DEBUG, read as Flask reads it. Flask turns the debugger on for anything but empty, 0, false and no
    ("off" and "0 " included), so only values whose meaning both readings share are accepted."""
    if not value:
        return False
    if value.lower() in ("0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(
        f"FLASK_DEBUG must be 1 (debugger on, development only) or 0 (off), not {value!r}: Flask reads anything "
        "but 0, false or no as on."
    )


def ascii_domain(domain: str) -> str | None:
    """A domain as DNS and ALLOWED_EMAIL_DOMAINS compare it: lower case, internationalised names in their ASCII
    (IDNA) form ("exämple.com" -> "xn--exmple-cua.com"); None for a name IDNA cannot encode."""
    try:
        return domain.lower().encode("idna").decode("ascii")
    except UnicodeError:
        return None


def readable_domain(domain: str) -> str:
    """xn--exmple-cua.com as people write it, exämple.com."""
    try:
        return domain.encode("ascii").decode("idna")
    except UnicodeError:
        return domain


def parse_domains(value: str | None) -> tuple[str, ...]:
    """ALLOWED_EMAIL_DOMAINS: comma-separated domains in their ASCII form (``@example.com`` is taken as example.com,
    ``exämple.com`` as xn--exmple-cua.com)."""
    names = [name.strip().removeprefix("@") for name in (value or "").split(",") if name.strip()]
    domains = tuple(dict.fromkeys(ascii_domain(name) or name for name in names))
    for domain in domains:
        if not DOMAIN.fullmatch(domain):
            raise ConfigError(
                f"ALLOWED_EMAIL_DOMAINS must list domains such as example.com (each subdomain by its full name, no "
                f"wildcards), not {domain!r}."
            )
    return domains


def parse_registration(value: str | None, domains: tuple[str, ...], production: bool) -> str:
    """REGISTRATION: open, domain (with ALLOWED_EMAIL_DOMAINS), invite or closed; invite in production unless set."""
    mode = (value or ("invite" if production else "open")).strip().lower()
    if mode not in REGISTRATION_MODES:
        raise ConfigError(f"REGISTRATION must be {', '.join(REGISTRATION_MODES)}, not {value!r}.")
    if mode == "domain" and not domains:
        raise ConfigError("ALLOWED_EMAIL_DOMAINS must list the accepted email domains when REGISTRATION=domain.")
    if mode != "domain" and domains:
        raise ConfigError(
            f"ALLOWED_EMAIL_DOMAINS is set but REGISTRATION is {mode}{'' if value else ' (the default)'}: set "
            "REGISTRATION=domain to accept only those domains, or remove ALLOWED_EMAIL_DOMAINS."
        )
    return mode


def password_problem(password: str, username: str | None, email: str | None, production: bool) -> str | None:
    """What is wrong with a password for this account, or None: the one rule for every password an account gets
    (registration, POST /api/users, a change, `flask create-admin`, ADMIN_PASSWORD). 8 to 128 characters, not the
    account's own username or email, and in production not a well-known password."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        return f"Length must be between {MIN_PASSWORD_LENGTH} and {MAX_PASSWORD_LENGTH}."
    lowered = password.strip().lower()
    if lowered in {username, email, (email or "").partition("@")[0]} - {None, ""}:
        return "Must not be your username or email address."
    if production and well_known_password(lowered):
        return (
            f"Must not be a well-known password such as {DEFAULT_ADMIN_PASSWORD!r} or 'password123': "
            "choose a passphrase of your own."
        )
    return None


@cache
def well_known_passwords() -> frozenset[str]:
    """This project's list and zxcvbn's 30,000 most common leaked passwords (loaded on first use: 0.1 s)."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return WELL_KNOWN_PASSWORDS | frozenset(FREQUENCY_LISTS["passwords"])


def password_candidates(lowered: str) -> set[str]:
    """The forms a well-known password takes inside this one: as typed; without symbols at the end ("trustno1!"
    -> "trustno1"); without digits and symbols at the end ("password123!" -> "password") or at both ends; each
    also with leetspeak undone ("p@$$w0rd" -> "password", "adm1n@123" -> "admin")."""
    stripped = {
        lowered,
        re.sub(r"[\W_]+$", "", lowered),
        re.sub(r"[\W\d_]+$", "", lowered),
        re.sub(r"^[\W\d_]+|[\W\d_]+$", "", lowered),
    }
    return stripped | {form.translate(table) for form in stripped for table in LEETSPEAK}


def well_known_password(lowered: str) -> bool:
    return len(set(lowered)) < 4 or not password_candidates(lowered).isdisjoint(well_known_passwords())


class Config:
    """Every setting the app reads, taken from ``environ`` (the process environment by default)."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        def env(name, default=None):
            return environ.get(name) or default

        self.APP_ENV = app_environment(env("APP_ENV"), env("FLASK_ENV"))
        production = self.APP_ENV == "production"
        # Flask reads FLASK_DEBUG itself (app.debug, `flask run`); this reading is for `python app.py`.
        self.FLASK_DEBUG = parse_debug(env("FLASK_DEBUG"))
        if production and self.FLASK_DEBUG:
            raise debugger_in_production("FLASK_DEBUG is on")

        self.SQLALCHEMY_DATABASE_URI = checked_database_url(
            env("DATABASE_URL", "sqlite:///finstack.db")  # relative SQLite paths live in the instance folder
        )
        # A request holds one connection: a sync worker needs one, a gthread worker one per thread (the
        # gunicorn.conf.py sets DB_POOL_SIZE to its threads). workers x pool x instances must fit max_connections.
        self.DB_CONNECT_TIMEOUT = parse_count(
            "DB_CONNECT_TIMEOUT", env("DB_CONNECT_TIMEOUT"), default=5, low=1, high=60
        )
        # Below gunicorn's worker timeout (30 s), so a slow statement is a 503, not a killed worker.
        self.DB_STATEMENT_TIMEOUT = parse_count(
            "DB_STATEMENT_TIMEOUT", env("DB_STATEMENT_TIMEOUT"), default=10_000, high=3_600_000
        )
        self.SQLALCHEMY_ENGINE_OPTIONS = engine_options(
            self.SQLALCHEMY_DATABASE_URI,
            pool_size=parse_count("DB_POOL_SIZE", env("DB_POOL_SIZE"), default=5, low=1, high=100),
            max_overflow=parse_count("DB_MAX_OVERFLOW", env("DB_MAX_OVERFLOW"), default=0, high=100),
            connect_timeout=self.DB_CONNECT_TIMEOUT,
            statement_timeout=self.DB_STATEMENT_TIMEOUT,
        )
        self.INSTANCE_PATH = env("INSTANCE_PATH")
        self.AUTO_MIGRATE = parse_flag("AUTO_MIGRATE", env("AUTO_MIGRATE"), default=not production)

        self.SECRET_KEY = env("SECRET_KEY")
        self.JWT_SECRET_KEY = env("JWT_SECRET_KEY")
        self.JWT_ACCESS_TOKEN_EXPIRES = timedelta(hours=24)
        self.JWT_REFRESH_TOKEN_EXPIRES = timedelta(days=30)
        self.JWT_TOKEN_LOCATION = ["headers"]
        self.JWT_COOKIE_CSRF_PROTECT = False  # bearer headers only: no cookies, so no CSRF claim to carry
        self.JWT_ALGORITHM = "HS256"
        self.JWT_DECODE_ALGORITHMS = ["HS256"]
        # Checked by hashing once, when set: a typo would otherwise surface as a 500 on every login.
        self.PASSWORD_HASH_METHOD = checked_hash_method(env("PASSWORD_HASH_METHOD", DEFAULT_PASSWORD_HASH_METHOD))

        self.ADMIN_USERNAME = env("ADMIN_USERNAME", "admin")
        self.ADMIN_EMAIL = env("ADMIN_EMAIL", "admin@finstack.com")
        self.ADMIN_PASSWORD = env("ADMIN_PASSWORD", None if production else DEFAULT_ADMIN_PASSWORD)

        self.ALLOWED_EMAIL_DOMAINS = parse_domains(env("ALLOWED_EMAIL_DOMAINS"))
        self.REGISTRATION = parse_registration(env("REGISTRATION"), self.ALLOWED_EMAIL_DOMAINS, production)

        self.configure_mail(env, production)
        self.CELERY_BROKER_URL = checked_broker_url(env("CELERY_BROKER_URL"))
        self.CELERY = celery_settings(self.CELERY_BROKER_URL, env("CELERY_QUEUE", "finstack"))

        self.CORS_ORIGINS = parse_origins(env("CORS_ORIGIN", DEFAULT_CORS_ORIGINS))
        self.MAX_CONTENT_LENGTH = 1024 * 1024
        # Render's load balancer adds one X-Forwarded-For hop; trust exactly that many, so clients cannot spoof it.
        self.TRUSTED_PROXY_COUNT = parse_count("TRUSTED_PROXY_COUNT", env("TRUSTED_PROXY_COUNT"), default=0)

        # Rate limits (Flask-Limiter reads the RATELIMIT_* names). Memory counts per worker process: production
        # needs a shared store, Redis, so that every worker and instance counts together.
        self.RATELIMIT_ENABLED = parse_flag("RATELIMIT_ENABLED", env("RATELIMIT_ENABLED"), default=True)
        self.RATELIMIT_STORAGE_URI = env("RATELIMIT_STORAGE_URI", None if production else "memory://")
        self.RATELIMIT_DEFAULT = parse_limits("RATELIMIT_DEFAULT", env("RATELIMIT_DEFAULT", "300 per minute"))
        self.RATELIMIT_LOGIN = parse_limits("RATELIMIT_LOGIN", env("RATELIMIT_LOGIN", "10 per minute"))
        self.RATELIMIT_LOGIN_FAILURES = parse_limits(
            "RATELIMIT_LOGIN_FAILURES", env("RATELIMIT_LOGIN_FAILURES", "5 per 15 minutes")
        )
        self.RATELIMIT_LOGIN_FAILURES_ACCOUNT = parse_limits(
            "RATELIMIT_LOGIN_FAILURES_ACCOUNT", env("RATELIMIT_LOGIN_FAILURES_ACCOUNT", "100 per hour; 500 per day")
        )
        self.RATELIMIT_REGISTER = parse_limits("RATELIMIT_REGISTER", env("RATELIMIT_REGISTER", "10 per minute"))
        self.RATELIMIT_REFRESH = parse_limits("RATELIMIT_REFRESH", env("RATELIMIT_REFRESH", "10 per minute"))
        # Emails with a link that anyone may have sent to one address (password resets, address changes' confirmations).
        self.RATELIMIT_ACCOUNT_EMAIL = parse_limits(
            "RATELIMIT_ACCOUNT_EMAIL", env("RATELIMIT_ACCOUNT_EMAIL", "3 per hour; 10 per day")
        )
        self.RATELIMIT_KEY_PREFIX = env("RATELIMIT_KEY_PREFIX", "finstack")
        self.LOG_LEVEL = env("LOG_LEVEL", "INFO").upper()
        if self.LOG_LEVEL not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.LOG_LEVEL!r}.")
        # JSON lines for log collectors in production; plain lines for people in development.
        self.LOG_FORMAT = env("LOG_FORMAT", "json" if production else "text").lower()
        if self.LOG_FORMAT not in LOG_FORMATS:
            raise ConfigError(f"LOG_FORMAT must be {' or '.join(LOG_FORMATS)}, not {self.LOG_FORMAT!r}.")
        self.METRICS_ENABLED = parse_flag("METRICS_ENABLED", env("METRICS_ENABLED"), default=True)
        self.METRICS_TOKEN = env("METRICS_TOKEN")
        self.VERSION = VERSION
        self.HOST = env("HOST", "127.0.0.1")  # `python app.py` only; gunicorn has --bind
        self.PORT = parse_port("PORT", env("PORT"), default=5000)

    def configure_mail(self, env, production: bool) -> None:
        """MAIL_*, FIRM_NAME and FRONTEND_URL, for mail.py. Values given are checked now; production demands what
        sending needs (check_production_settings)."""
        self.MAIL_BACKEND = env("MAIL_BACKEND", "smtp" if production else "file").strip().lower()
        if self.MAIL_BACKEND not in MAIL_BACKENDS:
            raise ConfigError(f"MAIL_BACKEND must be {', '.join(MAIL_BACKENDS)}, not {self.MAIL_BACKEND!r}.")
        self.MAIL_SERVER = env("MAIL_SERVER", None if production else "localhost")
        self.MAIL_SECURITY = env("MAIL_SECURITY", "starttls").strip().lower()
        if self.MAIL_SECURITY not in MAIL_SECURITY_PORTS:
            raise ConfigError(
                f"MAIL_SECURITY must be starttls (port 587), tls (port 465) or none (a local relay), not "
                f"{self.MAIL_SECURITY!r}."
            )
        self.MAIL_PORT = parse_port("MAIL_PORT", env("MAIL_PORT"), default=MAIL_SECURITY_PORTS[self.MAIL_SECURITY])
        self.MAIL_USERNAME = env("MAIL_USERNAME")
        self.MAIL_PASSWORD = env("MAIL_PASSWORD")
        if self.MAIL_USERNAME and self.MAIL_SECURITY == "none":
            raise ConfigError(
                "MAIL_USERNAME is set with MAIL_SECURITY=none, which would send the password unencrypted: use "
                "MAIL_SECURITY=starttls or tls, or unset MAIL_USERNAME for a relay that needs no login."
            )
        self.MAIL_TIMEOUT = parse_seconds("MAIL_TIMEOUT", env("MAIL_TIMEOUT"), default=10.0)
        self.MAIL_CA_FILE = checked_ca_file(env("MAIL_CA_FILE"))
        self.MAIL_FROM = env("MAIL_FROM", None if production else "tasks@localhost")
        if self.MAIL_FROM is not None and not MAIL_ADDRESS.fullmatch(self.MAIL_FROM):
            raise ConfigError(
                f"MAIL_FROM must be a bare email address such as tasks@example.com (FIRM_NAME is the name shown), "
                f"not {self.MAIL_FROM!r}."
            )
        # A Message-ID's right-hand side: a domain of the firm's, so ids never collide with another sender's.
        sender_domain = self.MAIL_FROM and self.MAIL_FROM.rpartition("@")[2]
        self.MAIL_MESSAGE_ID_DOMAIN = (env("MAIL_MESSAGE_ID_DOMAIN") or sender_domain or "").lower() or None
        if self.MAIL_MESSAGE_ID_DOMAIN and not DOMAIN.fullmatch(self.MAIL_MESSAGE_ID_DOMAIN):
            raise ConfigError(
                f"MAIL_MESSAGE_ID_DOMAIN (by default MAIL_FROM's domain) must be a domain such as example.com, not "
                f"{self.MAIL_MESSAGE_ID_DOMAIN!r}."
            )
        self.MAIL_DIR = env("MAIL_DIR")  # unset: mail/ in the instance folder, which only the app knows
        self.FIRM_NAME = env("FIRM_NAME", "FinStack")
        # The time zone of every user who has not chosen one (issue 16: "today" and "this week" are the user's).
        self.DEFAULT_TIME_ZONE = parse_time_zone(env("DEFAULT_TIME_ZONE", "UTC"))
        # Where the links in emails lead: the Angular app, which takes the token from the link and calls the API.
        self.FRONTEND_URL = parse_frontend_url(env("FRONTEND_URL", None if production else DEFAULT_FRONTEND_URL))


def debugger_in_production(how: str) -> ConfigError:
    return ConfigError(
        f"{how} in production: Werkzeug's debugger runs any code a visitor sends it. Serve production with "
        "gunicorn, with FLASK_DEBUG unset or 0."
    )


def resolve_secrets(config: dict, instance_path: str) -> None:
    """Demand real secrets in production; elsewhere generate each missing one once, in the instance folder."""
    for name in SECRET_NAMES:
        value = config.get(name)
        if config["APP_ENV"] == "production":
            if not value:
                raise ConfigError(f"{name} must be set when APP_ENV=production.")
            if len(value.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"{name} must be at least {MIN_SECRET_BYTES} bytes long in production.")
            if well_known_secret(value):
                raise ConfigError(
                    f"{name} looks like a placeholder or a published example, not a random secret: generate one with "
                    '`python -c "import secrets; print(secrets.token_urlsafe(48))"`.'
                )
        elif not value:
            config[name] = instance_secret(instance_path, name.lower())
    if config["APP_ENV"] == "production" and config["SECRET_KEY"] == config["JWT_SECRET_KEY"]:
        raise ConfigError("SECRET_KEY and JWT_SECRET_KEY must be two different secrets in production.")


def well_known_secret(value: str) -> bool:
    lowered = value.lower()
    return (
        lowered in WELL_KNOWN_SECRETS
        or any(word in lowered for word in WELL_KNOWN_SECRET_WORDS)
        or len(set(value)) < 10  # "aaaa...", "0123456789" repeated: typed, not generated
    )


def check_production_settings(config: Mapping) -> None:
    """Refuse production settings that would be unsafe, each with the fix in the message."""
    if config["APP_ENV"] != "production":
        return
    password = config.get("ADMIN_PASSWORD")
    problem = password and password_problem(
        password, config.get("ADMIN_USERNAME", "").lower(), config.get("ADMIN_EMAIL", "").lower(), production=True
    )
    if problem:
        raise ConfigError(f"ADMIN_PASSWORD: {problem}")
    if not meets_owasp_minimum(config["PASSWORD_HASH_METHOD"]):
        raise ConfigError(
            f"PASSWORD_HASH_METHOD {config['PASSWORD_HASH_METHOD']!r} is below the OWASP minimums: use "
            f"{DEFAULT_PASSWORD_HASH_METHOD} (the default) or scrypt:131072:8:1."
        )
    if config["METRICS_ENABLED"] and len((config.get("METRICS_TOKEN") or "").encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"METRICS_TOKEN must be set in production while METRICS_ENABLED is on, at least {MIN_SECRET_BYTES} "
            "bytes, so that only your Prometheus reads /metrics (or set METRICS_ENABLED=false)."
        )
    check_production_mail(config)
    if config["RATELIMIT_ENABLED"] and not config.get("RATELIMIT_STORAGE_URI"):
        raise ConfigError(
            "RATELIMIT_STORAGE_URI must be set in production, to Redis (redis://host:6379), so that every worker "
            "and instance shares one count; memory:// counts per worker process."
        )


def check_production_mail(config: Mapping) -> None:
    """Production sends email over SMTP, from Celery workers, with links to the web app; or it says it sends none."""
    if config["MAIL_BACKEND"] == "disabled":
        return
    if config["MAIL_BACKEND"] != "smtp":
        raise ConfigError(
            f"MAIL_BACKEND={config['MAIL_BACKEND']} writes email to files: in production set MAIL_BACKEND=smtp (the "
            "default) with MAIL_SERVER, or MAIL_BACKEND=disabled to send none."
        )
    needed = {
        "CELERY_BROKER_URL": "the Redis that carries jobs to the Celery workers, such as redis://host:6379/1",
        "MAIL_SERVER": "your SMTP server's host name",
        "MAIL_FROM": "the sender's address, such as tasks@example.com",
        "FRONTEND_URL": "the web app's address, where the links in emails lead",
    }
    missing = [name for name in needed if not config.get(name)]
    if missing:
        raise ConfigError(
            "Production sends email (password resets, invitations) and needs "
            + "; ".join(f"{name}: {needed[name]}" for name in missing)
            + ". Or set MAIL_BACKEND=disabled to send none."
        )


def startup_lock(instance_path: str) -> FileLock:
    """The lock that lets gunicorn workers starting at once take turns at start-up work (secrets, migrations)."""
    folder = Path(instance_path)
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / ".startup.lock")


def instance_secret(instance_path: str, name: str) -> str:
    """Read the secret kept in the instance folder, creating it first if this is the first start."""
    folder = Path(instance_path)
    path = folder / name
    with startup_lock(instance_path):  # exactly one of the workers starting at once writes the file
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        # Written aside and renamed into place, so a crash never leaves a half-written secret.
        draft = folder / f".{name}.new"
        draft.touch(mode=0o600)
        draft.write_text(secrets.token_urlsafe(48))
        os.replace(draft, path)
        return path.read_text().strip()
