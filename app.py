"""FinStack Tasks: the application factory, and the WSGI ``app`` for ``gunicorn app:app`` and ``flask``."""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import click
from dotenv import load_dotenv
from flask import Flask
from flask.helpers import get_load_dotenv
from flask_cors import CORS
from flask_migrate import Migrate
from flask_talisman import Talisman
from werkzeug.middleware.proxy_fix import ProxyFix

from commands import (
    create_admin_command,
    new_accounts_epoch_command,
    openapi_command,
    prepare_database,
    purge_deleted_command,
    purge_idempotency_keys_command,
    purge_tokens_command,
    seed_demo_command,
)
from config import (
    Config,
    ConfigError,
    check_production_settings,
    debugger_in_production,
    ping_idle_connections,
    reads_without_transactions,
    resolve_secrets,
)
from jobs import init_jobs
from models import db
from routes import (
    JSONProvider,
    accounts,
    analytics,
    auth,
    docs,
    export,
    health,
    invitations,
    outbox,
    refuse_other_content_types,
    tasks,
    users,
)
from routes.errors import register_error_handlers
from routes.limits import init_limiter
from routes.logs import configure_logging, register_request_logging
from routes.metrics import init_metrics

PROJECT = os.path.dirname(os.path.abspath(__file__))
MIGRATIONS = os.path.join(PROJECT, "migrations")

migrate = Migrate()


def create_app(config: Mapping | None = None) -> Flask:
    """Build the app from the environment; ``config`` overrides single settings (tests use it)."""
    app = Flask(__name__, static_folder=None)  # an API: no static files of its own
    app.url_map.merge_slashes = False  # "/api//tasks" is a JSON 404, not an HTML redirect
    app.json = JSONProvider(app)
    app.config.from_object(Config())
    app.config.update(config or {})
    if app.config["INSTANCE_PATH"]:
        app.instance_path = os.path.abspath(app.config["INSTANCE_PATH"])
    resolve_secrets(app.config, app.instance_path)
    check_production_settings(app.config)
    refuse_debugger_in_production(app)
    configure_logging(app)
    if app.config["TRUSTED_PROXY_COUNT"]:
        # The client address (for rate limits and logs) and scheme, from that many proxies' X-Forwarded-* headers.
        proxies = app.config["TRUSTED_PROXY_COUNT"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)

    db.init_app(app)
    with app.app_context():
        ping_idle_connections(db.engine)
        reads_without_transactions(db.engine)
    register_request_logging(app)  # the first hooks: the line, the request id and the timing cover all the others
    init_metrics(app)
    migrate.init_app(app, db, directory=MIGRATIONS, render_as_batch=True)
    auth.jwt.init_app(app)
    init_jobs(app)
    CORS(
        app,
        resources={r"/api/*": {"origins": app.config["CORS_ORIGINS"]}},
        allow_headers=["Authorization", "Content-Type", "X-Request-ID", "If-Match", "If-None-Match", "Idempotency-Key"],
        expose_headers=[
            "X-Request-ID",
            "ETag",
            "Idempotent-Replayed",
            "Content-Disposition",
            "Retry-After",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
        ],
        max_age=600,
        always_send=False,  # no Origin, no CORS headers: curl and servers are not browsers
    )
    talisman = Talisman(
        app,
        force_https=False,  # Render's edge redirects to HTTPS; its health checks and local runs are plain HTTP
        frame_options="DENY",
        content_security_policy={"default-src": "'none'", "frame-ancestors": "'none'"},  # JSON only: load nothing
        referrer_policy="no-referrer",
    )

    for module in (auth, accounts, users, tasks, export, analytics, outbox, invitations, health, docs):
        app.register_blueprint(module.bp)
    app.register_blueprint(docs.swagger_ui_blueprint())
    talisman(content_security_policy=docs.DOCS_CSP)(app.view_functions["swagger_ui.show"])
    register_error_handlers(app)
    app.before_request(refuse_other_content_types)
    init_limiter(app)  # after the request id, so a 429 carries one too
    app.cli.add_command(create_admin_command)
    app.cli.add_command(purge_tokens_command)
    app.cli.add_command(new_accounts_epoch_command)
    app.cli.add_command(purge_idempotency_keys_command)
    app.cli.add_command(purge_deleted_command)
    app.cli.add_command(openapi_command)
    app.cli.add_command(seed_demo_command)
    return app


def refuse_debugger_in_production(app: Flask) -> None:
    """Production never runs Werkzeug's debugger: not with debug on as Flask itself read it (FLASK_DEBUG, DEBUG), nor
    through `flask run --debugger`, which starts it whatever FLASK_DEBUG says."""
    if app.config["APP_ENV"] != "production":
        return
    if app.debug:
        raise debugger_in_production("Debug mode is on")
    context = click.get_current_context(silent=True)
    if context is not None and context.info_name == "run" and context.params.get("debugger"):
        raise debugger_in_production("flask run --debugger")


def serving() -> bool:
    """Is the app being built to serve requests? Any `flask` command but `flask run` only runs that command."""
    context = click.get_current_context(silent=True)
    return context is None or context.info_name == "run"


def load_env_file() -> None:
    """Read the project's `.env`, wherever the server is started from (FLASK_SKIP_DOTENV=1 turns it off)."""
    if get_load_dotenv():
        load_dotenv(os.path.join(PROJECT, ".env"))


def __getattr__(name: str):
    # `app` is built on first use (gunicorn and flask look it up), not on import, so that tests
    # and tools can import create_app without building the development app and its database.
    if name == "app":
        load_env_file()
        with configuration_errors_as_one_line(gunicorn_reports_them=True):
            application = create_app()
            if serving():
                prepare_database(application)
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def configuration_errors_as_one_line(gunicorn_reports_them: bool = False) -> Iterator[None]:
    """A configuration error stops the process with "Error: <what to change>" on stderr and exit status 1, as
    gunicorn reports it, rather than a traceback: in every `flask` command and in `python app.py`."""
    try:
        yield
    except ConfigError as error:
        if gunicorn_reports_them and click.get_current_context(silent=True) is None:
            raise  # gunicorn (or another importer): it prints "Error: ..." and exits 1 itself
        raise SystemExit(f"Error: {error}") from None


if __name__ == "__main__":
    load_env_file()
    with configuration_errors_as_one_line():
        application = create_app()
        prepare_database(application)
    application.extensions["jobs"].start()  # the embedded runner's sweep sends what an earlier run left
    application.run(
        host=application.config["HOST"],
        port=application.config["PORT"],
        debug=application.config["FLASK_DEBUG"],
    )
