"""Settings, read once from the environment (``.env`` is honoured by ``app.py``, gunicorn and ``flask``)."""

import os
import re
import secrets
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from filelock import FileLock
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from werkzeug.security import generate_password_hash

VERSION = "1.0.0"

DEFAULT_CORS_ORIGINS = "http://localhost:4200,http://127.0.0.1:4200"
DEFAULT_ADMIN_PASSWORD = "admin123"  # development only, documented, and warned about when used
MIN_SECRET_BYTES = 32
SECRET_NAMES = ("SECRET_KEY", "JWT_SECRET_KEY")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
APP_ENVS = ("development", "production")
# An exact origin: scheme and host (and port), no path and nothing Flask-CORS would read as a pattern.
ORIGIN = re.compile(
    r"[a-z][a-z0-9+.-]*://[A-Za-z0-9.-]+(:[0-9]{1,5})?|[a-z][a-z0-9+.-]*://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


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


def engine_options(url: str) -> dict:
    """Connection settings on PostgreSQL: bounded connect time, stale-connection checks, and sessions in UTC
    whatever the server's default (timestamps near year 1 or 9999 only exist in UTC)."""
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5, "options": "-c timezone=UTC"}}
    return {}


def parse_port(name: str, value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit() and 0 < int(value) < 65536):
        raise ConfigError(f"{name} must be a port number from 1 to 65535, not {value!r}.")
    return int(value)


def checked_hash_method(method: str) -> str:
    try:
        generate_password_hash("probe", method=method)
    except ValueError as error:
        raise ConfigError(f"PASSWORD_HASH_METHOD {method!r} is not a Werkzeug hash method: {error}") from None
    return method


def parse_origins(value: str) -> list[str]:
    origins = [origin.strip() for origin in value.split(",") if origin.strip()]
    for origin in origins:
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(f"CORS_ORIGIN must list exact origins such as https://tasks.example.com, not {origin!r}.")
    return origins


def parse_flag(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}.")


class Config:
    """Every setting the app reads, taken from ``environ`` (the process environment by default)."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        def env(name, default=None):
            return environ.get(name) or default

        self.APP_ENV = env("APP_ENV", "development")
        if self.APP_ENV not in APP_ENVS:
            raise ConfigError(f"APP_ENV must be {' or '.join(APP_ENVS)}, not {self.APP_ENV!r}.")
        production = self.APP_ENV == "production"

        self.SQLALCHEMY_DATABASE_URI = checked_database_url(
            env("DATABASE_URL", "sqlite:///finstack.db")  # relative SQLite paths live in the instance folder
        )
        self.SQLALCHEMY_ENGINE_OPTIONS = engine_options(self.SQLALCHEMY_DATABASE_URI)
        self.INSTANCE_PATH = env("INSTANCE_PATH")
        self.AUTO_MIGRATE = parse_flag("AUTO_MIGRATE", env("AUTO_MIGRATE"), default=not production)

        self.SECRET_KEY = env("SECRET_KEY")
        self.JWT_SECRET_KEY = env("JWT_SECRET_KEY")
        self.JWT_ACCESS_TOKEN_EXPIRES = timedelta(hours=24)
        self.JWT_TOKEN_LOCATION = ["headers"]
        self.JWT_COOKIE_CSRF_PROTECT = False  # bearer headers only: no cookies, so no CSRF claim to carry
        self.JWT_ALGORITHM = "HS256"
        self.JWT_DECODE_ALGORITHMS = ["HS256"]
        # Checked by hashing once, when set: a typo would otherwise surface as a 500 on every login.
        hash_method = env("PASSWORD_HASH_METHOD")
        self.PASSWORD_HASH_METHOD = checked_hash_method(hash_method) if hash_method else "scrypt"

        self.ADMIN_USERNAME = env("ADMIN_USERNAME", "admin")
        self.ADMIN_EMAIL = env("ADMIN_EMAIL", "admin@finstack.com")
        self.ADMIN_PASSWORD = env("ADMIN_PASSWORD", None if production else DEFAULT_ADMIN_PASSWORD)

        self.CORS_ORIGINS = parse_origins(env("CORS_ORIGIN", DEFAULT_CORS_ORIGINS))
        self.MAX_CONTENT_LENGTH = 1024 * 1024
        self.LOG_LEVEL = env("LOG_LEVEL", "INFO").upper()
        if self.LOG_LEVEL not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.LOG_LEVEL!r}.")
        self.VERSION = VERSION
        self.HOST = env("HOST", "127.0.0.1")  # `python app.py` only; gunicorn has --bind
        self.PORT = parse_port("PORT", env("PORT"), default=5000)


def resolve_secrets(config: dict, instance_path: str) -> None:
    """Demand real secrets in production; elsewhere generate each missing one once, in the instance folder."""
    for name in SECRET_NAMES:
        value = config.get(name)
        if config["APP_ENV"] == "production":
            if not value:
                raise ConfigError(f"{name} must be set when APP_ENV=production.")
            if len(value.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"{name} must be at least {MIN_SECRET_BYTES} bytes long in production.")
        elif not value:
            config[name] = instance_secret(instance_path, name.lower())


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
