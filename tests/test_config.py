"""Settings from the environment: defaults, validation, secrets, and what production refuses."""

import os
import re
import stat
import subprocess
import sys

import pytest
import sqlalchemy as sa

import app as app_module
from app import create_app
from config import Config, ConfigError, meets_owasp_minimum, normalise_database_url, password_problem
from helpers import POSTGRES_SERVER, PRODUCTION, REDIS_URL, ROOT, free_port, gunicorn, settings
from models import db


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.render.com:5432/finstack", "postgresql+psycopg2://u:p@db.render.com:5432/finstack"),
        ("postgresql://u:p@localhost/finstack", "postgresql+psycopg2://u:p@localhost/finstack"),
        ("postgresql+psycopg2://u@localhost/finstack", "postgresql+psycopg2://u@localhost/finstack"),
        ("sqlite:///finstack.db", "sqlite:///finstack.db"),
        ("sqlite:////var/data/finstack.db", "sqlite:////var/data/finstack.db"),
    ],
)
def test_database_url_is_normalised_for_psycopg2(given, expected):
    assert normalise_database_url(given) == expected
    assert expected == Config({"DATABASE_URL": given}).SQLALCHEMY_DATABASE_URI


def test_defaults_need_no_environment():
    config = Config({})

    assert config.APP_ENV == "development"
    assert config.SQLALCHEMY_DATABASE_URI == "sqlite:///finstack.db"
    assert config.AUTO_MIGRATE is True
    assert config.CORS_ORIGINS == ["http://localhost:4200", "http://127.0.0.1:4200"]
    assert (config.ADMIN_USERNAME, config.ADMIN_EMAIL, config.ADMIN_PASSWORD) == (
        "admin",
        "admin@finstack.com",
        "admin123",
    )
    assert config.MAX_CONTENT_LENGTH == 1024 * 1024


def test_production_defaults_migrate_nothing_and_create_no_admin():
    config = Config({"APP_ENV": "production"})

    assert config.AUTO_MIGRATE is False
    assert config.ADMIN_PASSWORD is None


def test_cors_origin_is_a_comma_separated_list():
    config = Config({"CORS_ORIGIN": "https://app.finstack.com, https://staging.finstack.com,"})

    assert config.CORS_ORIGINS == ["https://app.finstack.com", "https://staging.finstack.com"]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"AUTO_MIGRATE": "sometimes"}, "AUTO_MIGRATE must be true or false"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be"),
        ({"RATELIMIT_LOGIN": "lots"}, "RATELIMIT_LOGIN must be a rate limit"),
        ({"RATELIMIT_DEFAULT": "10 per fortnight"}, "RATELIMIT_DEFAULT must be a rate limit"),
        ({"RATELIMIT_ENABLED": "perhaps"}, "RATELIMIT_ENABLED must be true or false"),
        ({"TRUSTED_PROXY_COUNT": "-1"}, "TRUSTED_PROXY_COUNT must be a whole number"),
        ({"TRUSTED_PROXY_COUNT": "one"}, "TRUSTED_PROXY_COUNT must be a whole number"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE must be a whole number from 1 to 100"),
        ({"DB_MAX_OVERFLOW": "many"}, "DB_MAX_OVERFLOW must be a whole number from 0 to 100"),
        ({"DB_CONNECT_TIMEOUT": "0"}, "DB_CONNECT_TIMEOUT must be a whole number from 1 to 60"),
        ({"DB_STATEMENT_TIMEOUT": "10s"}, "DB_STATEMENT_TIMEOUT must be a whole number from 0 to 3600000"),
        ({"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED must be true or false"),
        ({"APP_ENV": "development", "FLASK_ENV": "production"}, "APP_ENV=development and FLASK_ENV=production"),
        ({"APP_ENV": "production", "FLASK_ENV": "development"}, "APP_ENV=production and FLASK_ENV=development"),
        ({"FLASK_ENV": "prod"}, "FLASK_ENV must be development or production, not 'prod'"),
        ({"APP_ENV": "staging"}, "APP_ENV must be development or production, not 'staging'"),
        # Flask reads all three as on: refused everywhere rather than read one way here and another by Flask.
        ({"FLASK_DEBUG": "maybe"}, "FLASK_DEBUG must be 1 (debugger on, development only) or 0 (off), not 'maybe'"),
        ({"FLASK_DEBUG": "off"}, "FLASK_DEBUG must be 1 (debugger on, development only) or 0 (off), not 'off'"),
        ({"FLASK_DEBUG": "0 ", "APP_ENV": "production"}, "FLASK_DEBUG must be 1 (debugger on"),
        ({"REGISTRATION": "invited"}, "REGISTRATION must be open, domain, invite, closed, not 'invited'"),
        ({"DEFAULT_TIME_ZONE": "CET+1"}, "DEFAULT_TIME_ZONE must be an IANA time zone name such as Europe/London"),
        ({"DEFAULT_TIME_ZONE": "europe/london"}, "not 'europe/london'"),
        ({"FRONTEND_URL": "tasks.example.com"}, "FRONTEND_URL must be the web app's address"),
        ({"FRONTEND_URL": "https://tasks.example.com/?next=1"}, "FRONTEND_URL must be the web app's address"),
        ({"REGISTRATION": "domain"}, "ALLOWED_EMAIL_DOMAINS must list the accepted email domains"),
        ({"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": " , "}, "ALLOWED_EMAIL_DOMAINS must list"),
        ({"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": "*.example.com"}, "no wildcards"),
        ({"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": "bob@example.com"}, "domains such as example.com"),
        ({"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": "example..com"}, "not 'example..com'"),
        ({"ALLOWED_EMAIL_DOMAINS": "example.com"}, "ALLOWED_EMAIL_DOMAINS is set but REGISTRATION is open"),
        (
            {"REGISTRATION": "closed", "ALLOWED_EMAIL_DOMAINS": "example.com"},
            "ALLOWED_EMAIL_DOMAINS is set but REGISTRATION is closed",
        ),
    ],
)
def test_a_malformed_setting_is_a_clear_error(environment, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(environment)


def test_the_connection_pool_is_sized_by_the_environment():
    url = "postgresql://postgres@127.0.0.1:5432/finstack"

    default = Config({"DATABASE_URL": url}).SQLALCHEMY_ENGINE_OPTIONS
    sized = Config({"DATABASE_URL": url, "DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "2"}).SQLALCHEMY_ENGINE_OPTIONS

    assert (default["pool_size"], default["max_overflow"]) == (5, 0)
    assert (sized["pool_size"], sized["max_overflow"]) == (4, 2)


def test_every_postgresql_wait_is_bounded():
    url = "postgresql://postgres@127.0.0.1:5432/finstack"
    default = Config({"DATABASE_URL": url}).SQLALCHEMY_ENGINE_OPTIONS
    tuned = Config({"DATABASE_URL": url, "DB_CONNECT_TIMEOUT": "2", "DB_STATEMENT_TIMEOUT": "2500"})

    assert default["connect_args"]["connect_timeout"] == 5
    assert "-c statement_timeout=10000" in default["connect_args"]["options"]
    assert default["connect_args"]["keepalives"] == 1 and default["connect_args"]["tcp_user_timeout"] > 0
    assert default["pool_timeout"] < 30 and default["hide_parameters"] is True
    assert tuned.SQLALCHEMY_ENGINE_OPTIONS["connect_args"]["connect_timeout"] == 2
    assert "-c statement_timeout=2500" in tuned.SQLALCHEMY_ENGINE_OPTIONS["connect_args"]["options"]


def test_postgresql_sessions_run_without_jit():
    """The database as the app's connections see it: JIT would add tens of ms to the filtered dashboard."""
    engine = sa.create_engine(POSTGRES_SERVER, **Config({"DATABASE_URL": POSTGRES_SERVER}).SQLALCHEMY_ENGINE_OPTIONS)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW jit").scalar() == "off"
    engine.dispose()


def test_env_example_documents_every_setting():
    read = set(re.findall(r'env\("([A-Z_]+)"', (ROOT / "config.py").read_text()))
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))

    assert read <= documented, read - documented


def test_development_generates_secrets_once_and_keeps_them(tmp_path):
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, SECRET_KEY=None, JWT_SECRET_KEY=None)

    first = create_app(config)
    second = create_app(config)

    assert len(first.config["SECRET_KEY"]) >= 32
    assert len(first.config["JWT_SECRET_KEY"]) >= 32
    assert first.config["SECRET_KEY"] != first.config["JWT_SECRET_KEY"]
    assert (second.config["SECRET_KEY"], second.config["JWT_SECRET_KEY"]) == (
        first.config["SECRET_KEY"],
        first.config["JWT_SECRET_KEY"],
    )
    secret_file = tmp_path / "instance" / "jwt_secret_key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_an_empty_secret_file_is_replaced(tmp_path):
    (tmp_path / "instance").mkdir()
    (tmp_path / "instance" / "jwt_secret_key").write_text("")
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, JWT_SECRET_KEY=None)

    app = create_app(config)

    assert len(app.config["JWT_SECRET_KEY"]) >= 32
    assert (tmp_path / "instance" / "jwt_secret_key").read_text() == app.config["JWT_SECRET_KEY"]


def test_token_from_before_a_restart_stays_valid(tmp_path):
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, SECRET_KEY=None, JWT_SECRET_KEY=None)
    before = create_app(config)
    with before.app_context():
        db.create_all()
    before.test_client().post(
        "/api/auth/register",
        json={"username": "erin", "email": "erin@example.com", "password": "long-enough-1", "full_name": "Erin"},
    )
    token = (
        before.test_client()
        .post("/api/auth/login", json={"username": "erin", "password": "long-enough-1"})
        .get_json()["access_token"]
    )

    after = create_app(config)

    assert after.test_client().get("/api/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


SECRET, JWT_SECRET = PRODUCTION["SECRET_KEY"], PRODUCTION["JWT_SECRET_KEY"]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"JWT_SECRET_KEY": JWT_SECRET}, "SECRET_KEY must be set"),
        ({"SECRET_KEY": SECRET}, "JWT_SECRET_KEY must be set"),
        ({"SECRET_KEY": "too-short", "JWT_SECRET_KEY": JWT_SECRET}, "SECRET_KEY must be at least 32 bytes"),
        ({"SECRET_KEY": SECRET, "JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY must be at least 32 bytes"),
    ],
)
def test_production_refuses_to_start_without_real_secrets(monkeypatch, tmp_path, environment, message):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=message):
        create_app()
    assert not (tmp_path / "instance" / "secret_key").exists()


def test_production_starts_with_real_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    for name, value in PRODUCTION.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))

    app = create_app()

    assert app.config["SECRET_KEY"] == SECRET


def test_env_file_is_read_from_the_project_folder_wherever_the_server_starts(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("FINSTACK_ENV_FILE_PROBE=from-the-project\n")
    monkeypatch.setenv("FINSTACK_ENV_FILE_PROBE", "")
    monkeypatch.delenv("FINSTACK_ENV_FILE_PROBE")  # restored, i.e. removed again, after the test
    monkeypatch.setattr(app_module, "PROJECT", str(tmp_path))
    monkeypatch.chdir("/")

    app_module.load_env_file()

    assert os.environ["FINSTACK_ENV_FILE_PROBE"] == "from-the-project"


def test_env_file_can_be_switched_off(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("FINSTACK_ENV_FILE_PROBE=from-the-project\n")
    monkeypatch.setenv("FINSTACK_ENV_FILE_PROBE", "")
    monkeypatch.delenv("FINSTACK_ENV_FILE_PROBE")
    monkeypatch.setattr(app_module, "PROJECT", str(tmp_path))
    monkeypatch.setenv("FLASK_SKIP_DOTENV", "1")

    app_module.load_env_file()

    assert "FINSTACK_ENV_FILE_PROBE" not in os.environ


# Everything production needs to send email (helpers.PRODUCTION disables it).
SENDING = {
    "MAIL_BACKEND": "smtp",
    "CELERY_BROKER_URL": REDIS_URL,
    "MAIL_SERVER": "smtp.example.com",
    "MAIL_FROM": "tasks@example.com",
    "FRONTEND_URL": "https://tasks.example.com",
}


def production(tmp_path, **changes) -> dict:
    environ = {**PRODUCTION, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}", "INSTANCE_PATH": str(tmp_path)}
    return {name: value for name, value in (environ | changes).items() if value is not None}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SECRET_KEY": "change-me-to-a-long-random-string-before-deploying"}, "SECRET_KEY looks like a placeholder"),
        ({"JWT_SECRET_KEY": "x" * 64}, "JWT_SECRET_KEY looks like a placeholder"),
        ({"JWT_SECRET_KEY": "test-jwt-secret-key-0123456789-0123456789-0123456789"}, "JWT_SECRET_KEY looks like"),
        ({"JWT_SECRET_KEY": PRODUCTION["SECRET_KEY"]}, "must be two different secrets"),
        ({"ADMIN_PASSWORD": "admin123"}, "ADMIN_PASSWORD: Must not be a well-known password"),
        ({"ADMIN_PASSWORD": "password123"}, "ADMIN_PASSWORD: Must not be a well-known password"),
        ({"ADMIN_PASSWORD": "Admin@2024!"}, "ADMIN_PASSWORD: Must not be a well-known password"),
        ({"ADMIN_PASSWORD": "demo-password"}, "ADMIN_PASSWORD: Must not be a well-known password"),
        ({"ADMIN_PASSWORD": "short"}, "ADMIN_PASSWORD: Length must be between 8 and 128"),
        ({"ADMIN_USERNAME": "operator", "ADMIN_PASSWORD": "Operator"}, "ADMIN_PASSWORD: Must not be your username"),
        ({"FLASK_DEBUG": "1"}, "FLASK_DEBUG is on in production"),
        ({"FLASK_DEBUG": "true"}, "FLASK_DEBUG is on in production"),
        ({"FLASK_DEBUG": "On"}, "FLASK_DEBUG is on in production"),
        ({"CORS_ORIGIN": "*"}, "CORS_ORIGIN must not contain a wildcard"),
        ({"CORS_ORIGIN": "https://app.finstack.com,https://*.finstack.com"}, "CORS_ORIGIN must not contain a wildcard"),
        ({"PASSWORD_HASH_METHOD": "scrypt"}, "below the OWASP minimums"),
        ({"PASSWORD_HASH_METHOD": "pbkdf2:sha256:599999"}, "below the OWASP minimums"),
        ({"RATELIMIT_STORAGE_URI": None}, "RATELIMIT_STORAGE_URI must be set in production"),
        ({"MAIL_BACKEND": None}, "needs CELERY_BROKER_URL: .*; MAIL_SERVER: .*; MAIL_FROM: .*; FRONTEND_URL: "),
        (
            {**SENDING, "CELERY_BROKER_URL": None},
            r"needs CELERY_BROKER_URL: the Redis .*\. Or set MAIL_BACKEND=disabled",
        ),
        ({**SENDING, "MAIL_SERVER": None}, "needs MAIL_SERVER: your SMTP server's host name"),
        ({**SENDING, "FRONTEND_URL": None}, "needs FRONTEND_URL: the web app's address"),
        ({**SENDING, "MAIL_BACKEND": "file"}, "MAIL_BACKEND=file writes email to files: in production set"),
        ({**SENDING, "CELERY_BROKER_URL": "amqp://localhost"}, "CELERY_BROKER_URL must be a Redis URL"),
    ],
)
def test_production_refuses_unsafe_settings_with_a_clear_message(monkeypatch, tmp_path, changes, message):
    for name, value in production(tmp_path, **changes).items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=message):
        create_app()


@pytest.mark.parametrize(
    "changes",
    [
        {"PASSWORD_HASH_METHOD": "scrypt:131072:8:1"},
        {"PASSWORD_HASH_METHOD": "pbkdf2:sha512:210000"},
        {"RATELIMIT_STORAGE_URI": None, "RATELIMIT_ENABLED": "false"},
        {"ADMIN_PASSWORD": "a-long-and-private-passphrase"},
        {"ADMIN_PASSWORD": "ops-password-1"},  # a well-known word inside a longer passphrase is fine
        {"FLASK_DEBUG": "0"},
        {"FLASK_DEBUG": "false"},
        {"FLASK_DEBUG": "No"},
        SENDING,
    ],
)
def test_production_accepts_safe_alternatives(monkeypatch, tmp_path, changes):
    for name, value in production(tmp_path, **changes).items():
        monkeypatch.setenv(name, value)

    assert create_app().config["APP_ENV"] == "production"


def test_production_refuses_debug_mode_however_flask_was_told(monkeypatch, tmp_path):
    for name, value in production(tmp_path).items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match="Debug mode is on in production: Werkzeug's debugger runs any code"):
        create_app({"DEBUG": True})


@pytest.mark.parametrize(
    "password",
    [
        # Listed passwords that end in digits themselves, with a symbol added.
        "trustno1!",
        "12345678!",
        "abcd1234!",
        "0987654321!",
        # Leaked-password lists' favourites: keyboard walks, digits around words, leetspeak, a season and a year.
        "1q2w3e4r",
        "1qaz2wsx",
        "aa123456",
        "zxcvbnm1",
        "qwe123qwe",
        "123qweasd",
        "123password",
        "P@$$w0rd",
        "p4ssw0rd",
        "pa$$word1",
        "Adm1n@123",
        "Summer2024!",
        "letmein!!",
        "admin123",
        "Admin@2024!",
        "demo-password",
    ],
)
def test_well_known_passwords_are_refused_in_production_in_every_disguise(password):
    assert password_problem(password, None, None, production=False) is None
    assert password_problem(password, None, None, production=True) == (
        "Must not be a well-known password such as 'admin123' or 'password123': choose a passphrase of your own."
    )


@pytest.mark.parametrize(
    "password",
    ["ops-password-1", "correct horse", "correct-horse-battery", "s3cret-passphrase", "0ps-password", "n3w-pass!",
     "leaving-soon", "a-long-and-private-passphrase", "x7#Kq9!2mZ", "Tr0ub4dor&3", "erin-passphrase"],
)  # fmt: skip
def test_passphrases_of_ones_own_are_accepted_in_production(password):
    assert password_problem(password, "erin", "erin@example.com", production=True) is None


def test_development_tolerates_what_production_refuses(tmp_path):
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, ADMIN_PASSWORD="admin123")

    assert create_app(config).config["PASSWORD_HASH_METHOD"] == "scrypt:1024:8:1"


@pytest.mark.parametrize(
    ("method", "meets"),
    [
        ("pbkdf2:sha256:600000", True),
        ("pbkdf2:sha256:1000000", True),
        ("pbkdf2:sha256:599999", False),
        ("pbkdf2:sha512:210000", True),
        ("pbkdf2:sha1:600000", False),
        ("scrypt:131072:8:1", True),
        ("scrypt:65536:8:2", True),
        ("scrypt:32768:8:1", False),
        ("scrypt:131072:4:1", False),
    ],
)
def test_owasp_minimums(method, meets):
    assert meets_owasp_minimum(method) is meets


def test_the_default_hash_method_meets_owasp_and_is_stored_in_full():
    config = Config({})

    assert config.PASSWORD_HASH_METHOD == "pbkdf2:sha256:600000"
    assert meets_owasp_minimum(config.PASSWORD_HASH_METHOD)
    assert Config({"PASSWORD_HASH_METHOD": "scrypt"}).PASSWORD_HASH_METHOD == "scrypt:32768:8:1"


def test_limits_and_proxies_have_documented_defaults():
    config = Config({})

    assert (config.RATELIMIT_ENABLED, config.RATELIMIT_STORAGE_URI) == (True, "memory://")
    assert (config.RATELIMIT_LOGIN, config.RATELIMIT_LOGIN_FAILURES) == ("10 per minute", "5 per 15 minutes")
    assert config.TRUSTED_PROXY_COUNT == 0


def test_flask_env_production_means_production_when_app_env_is_unset():
    config = Config({"FLASK_ENV": "production"})

    assert config.APP_ENV == "production"
    assert (config.AUTO_MIGRATE, config.ADMIN_PASSWORD, config.REGISTRATION) == (False, None, "invite")
    assert config.RATELIMIT_STORAGE_URI is None  # so production's checks demand Redis, secrets and a metrics token


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, "development"),
        ({"FLASK_ENV": "development"}, "development"),
        ({"APP_ENV": "production"}, "production"),
        ({"APP_ENV": "production", "FLASK_ENV": "production"}, "production"),
        ({"APP_ENV": "development", "FLASK_ENV": "development"}, "development"),
        ({"APP_ENV": "production", "FLASK_ENV": ""}, "production"),  # empty is unset
    ],
)
def test_app_env_and_flask_env_that_agree_choose_the_environment(environment, expected):
    assert expected == Config(environment).APP_ENV


def test_flask_debug_is_left_to_flask_in_development():
    assert Config({"FLASK_DEBUG": "1"}).APP_ENV == "development"


@pytest.mark.parametrize(
    ("environment", "mode", "domains"),
    [
        ({}, "open", ()),
        ({"APP_ENV": "production"}, "invite", ()),
        ({"FLASK_ENV": "production"}, "invite", ()),
        ({"REGISTRATION": "invite"}, "invite", ()),
        ({"APP_ENV": "production", "REGISTRATION": "open"}, "open", ()),
        ({"REGISTRATION": "closed"}, "closed", ()),
        (
            {"REGISTRATION": "Domain", "ALLOWED_EMAIL_DOMAINS": " Example.com, @corp.example.org,example.com"},
            "domain",
            ("example.com", "corp.example.org"),
        ),
        (  # internationalised names in their ASCII (IDNA) form, as email domains are compared
            {"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": "Exämple.com,xn--exmple-cua.com,bücher.de"},
            "domain",
            ("xn--exmple-cua.com", "xn--bcher-kva.de"),
        ),
    ],
)
def test_registration_is_open_in_development_and_by_invitation_in_production_unless_set(environment, mode, domains):
    config = Config(environment)

    assert (mode, domains) == (config.REGISTRATION, config.ALLOWED_EMAIL_DOMAINS)


def run_flask(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flask", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def start_gunicorn(env: dict) -> subprocess.CompletedProcess:
    """gunicorn as the server runs (it exits at once when the app cannot be built, or is stopped after 30 s)."""
    command = [part.format(port=free_port()) for part in gunicorn("--workers", "1")]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_flask_env_production_alone_makes_the_server_production(environment):
    """Without secrets neither gunicorn nor `flask` starts, where FLASK_ENV=production used to run as development:
    migrating by itself, creating admin/admin123 and serving /metrics to anyone."""
    flask_env = {k: v for k, v in environment.items() if k != "APP_ENV"} | {"FLASK_ENV": "production"}

    served = start_gunicorn(flask_env)
    routes = run_flask("routes", env=flask_env)

    assert served.returncode == 1
    assert "Error: SECRET_KEY must be set when APP_ENV=production." in served.stderr.splitlines()
    assert (routes.returncode, routes.stderr.strip()) == (1, "Error: SECRET_KEY must be set when APP_ENV=production.")


def test_app_env_and_flask_env_that_disagree_stop_flask_naming_both(environment):
    result = run_flask("routes", env=environment | {"APP_ENV": "development", "FLASK_ENV": "production"})

    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: APP_ENV=development and FLASK_ENV=production disagree")
    assert "Traceback" not in result.stderr


def test_a_configuration_error_stops_any_flask_command_with_the_line_gunicorn_prints(environment):
    broken = environment | {"APP_ENV": "production"}  # and no secrets
    served = start_gunicorn(broken)
    assert served.returncode == 1
    assert "Error: SECRET_KEY must be set when APP_ENV=production." in served.stderr.splitlines()

    for command in (["db", "upgrade"], ["routes"], ["create-admin", "--password", "x"], ["--help"]):
        result = run_flask(*command, env=broken)

        assert result.returncode == 1, command
        assert result.stderr.strip() == "Error: SECRET_KEY must be set when APP_ENV=production.", command
        assert result.stdout == "", command


def run_until_it_exits(command: list[str], env: dict, timeout: float = 30) -> tuple[int | None, str]:
    """Run a server command that should refuse to start: its exit status and stderr, or None if it was still
    running after ``timeout`` seconds (it is killed then)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return None, stderr
    return process.returncode, stderr


@pytest.mark.parametrize(
    ("command", "changes", "line"),
    [
        (["app.py"], {"FLASK_DEBUG": "1"}, "Error: FLASK_DEBUG is on in production: Werkzeug's debugger runs any"),
        (
            ["-m", "flask", "run", "--debugger", "--port", "{port}"],
            {},
            "Error: flask run --debugger in production: Werkzeug's debugger runs any code a visitor sends it.",
        ),
        (["-m", "flask", "run", "--port", "{port}"], {"FLASK_DEBUG": "1"}, "Error: FLASK_DEBUG is on in production"),
    ],
    ids=["python-app.py", "flask-run-debugger", "flask-run-flask-debug"],
)
def test_production_never_starts_the_debugger(environment, command, changes, line):
    command = [sys.executable, *(part.format(port=free_port()) for part in command)]

    status, stderr = run_until_it_exits(command, environment | PRODUCTION | changes)

    assert (status, len(stderr.strip().splitlines())) == (1, 1), stderr
    assert stderr.startswith(line)
    assert "Traceback" not in stderr


def test_a_malformed_flask_debug_stops_python_app_py_in_one_line(environment):
    status, stderr = run_until_it_exits([sys.executable, "app.py"], environment | {"FLASK_DEBUG": "maybe"})

    assert status == 1, stderr
    assert stderr.strip() == (
        "Error: FLASK_DEBUG must be 1 (debugger on, development only) or 0 (off), not 'maybe': Flask reads anything "
        "but 0, false or no as on."
    )


def test_app_env_in_the_env_file_and_flask_env_in_the_environment_that_disagree_refuse(tmp_path, monkeypatch):
    """Render sets FLASK_ENV=production; a .env copied from .env.example with APP_ENV=development uncommented must
    not make that server development."""
    (tmp_path / ".env").write_text("APP_ENV=development\n")
    monkeypatch.setenv("APP_ENV", "")
    monkeypatch.delenv("APP_ENV")  # restored, i.e. removed again, after the test
    monkeypatch.setenv("FLASK_ENV", "production")
    monkeypatch.setattr(app_module, "PROJECT", str(tmp_path))

    app_module.load_env_file()

    assert os.environ["APP_ENV"] == "development"
    with pytest.raises(ConfigError, match="APP_ENV=development and FLASK_ENV=production disagree"):
        Config()


def test_flask_reads_the_env_file_and_refuses_the_disagreement_in_one_line(environment, tmp_path):
    (tmp_path / ".env").write_text("APP_ENV=development\n")
    env = {k: v for k, v in environment.items() if k not in ("APP_ENV", "FLASK_SKIP_DOTENV")}

    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(ROOT / "app.py"), "routes"],
        cwd=tmp_path,
        env=env | {"FLASK_ENV": "production"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.startswith("Error: APP_ENV=development and FLASK_ENV=production disagree")
    assert len(result.stderr.strip().splitlines()) == 1
