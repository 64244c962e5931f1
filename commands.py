"""``flask`` commands, and the start-up steps that share their code."""

import json

import click
import flask_migrate
from flask import Flask, current_app
from flask.cli import with_appcontext
from marshmallow import ValidationError
from sqlalchemy import delete, inspect, select
from sqlalchemy.exc import IntegrityError, OperationalError

from config import DEFAULT_ADMIN_PASSWORD, ConfigError, startup_lock
from models import LoginSession, RevokedToken, User, db, utcnow
from routes.auth import create_user, duplicate_user
from routes.docs import openapi_document
from routes.errors import describe_validation, is_transient
from schemas import RegisterSchema

ADMIN_FULL_NAME = "Administrator"


def admin_fields(username: str, email: str, password: str, full_name: str = ADMIN_FULL_NAME) -> dict:
    """The admin's details, checked by the same rules as a registration."""
    return RegisterSchema().load({"username": username, "email": email, "password": password, "full_name": full_name})


def schema_exists() -> bool:
    return inspect(db.engine).has_table(User.__tablename__)


@click.command("create-admin")
@click.option("--username", help="Default: ADMIN_USERNAME, else admin.")
@click.option("--email", help="Default: ADMIN_EMAIL, else admin@finstack.com.")
@click.option("--full-name", default=ADMIN_FULL_NAME, show_default=True)
# Only a password given on purpose: never the development default that the app's settings fall back to.
@click.option("--password", envvar="ADMIN_PASSWORD", prompt=True, hide_input=True, confirmation_prompt=True)
@with_appcontext
def create_admin_command(username: str | None, email: str | None, full_name: str, password: str) -> None:
    """Create an administrator account (asks for the password unless ADMIN_PASSWORD is set)."""
    config = current_app.config
    try:
        data = admin_fields(username or config["ADMIN_USERNAME"], email or config["ADMIN_EMAIL"], password, full_name)
    except ValidationError as error:
        raise click.UsageError(describe_validation(error.normalized_messages())) from None
    if not schema_exists():
        raise click.ClickException("The database has no tables yet: run `flask db upgrade` first.")
    create_user(**data, is_admin=True)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise click.ClickException(duplicate_user(data["username"], data["email"]).message) from None
    click.echo(f"Created administrator '{data['username']}'.")


@click.command("purge-tokens")
@with_appcontext
def purge_tokens_command() -> None:
    """Delete blocklist entries and login sessions whose tokens have all expired (safe to run at any time)."""
    now = utcnow()
    revoked = db.session.execute(delete(RevokedToken).where(RevokedToken.expires_at <= now)).rowcount
    sessions = db.session.execute(delete(LoginSession).where(LoginSession.expires_at <= now)).rowcount
    db.session.commit()
    click.echo(f"Purged {revoked} expired blocklist entries and {sessions} expired login sessions.")


@click.command("openapi")
@click.option(
    "--server",
    default="http://127.0.0.1:5000",
    show_default=True,
    help="The base URL the document tells clients to call.",
)
@with_appcontext
def openapi_command(server: str) -> None:
    """Print the OpenAPI document, e.g. for Postman: flask openapi > openapi.json."""
    click.echo(json.dumps(openapi_document(current_app, server.rstrip("/") or "/"), indent=2))


def prepare_database(app: Flask) -> None:
    """Before serving: apply pending migrations (when AUTO_MIGRATE) and create the first admin (when configured)."""
    with app.app_context():
        if app.config["AUTO_MIGRATE"]:
            migrate_to_latest(app)
        if app.config["ADMIN_PASSWORD"]:
            create_first_admin(app)


def migrate_to_latest(app: Flask) -> None:
    """``flask db upgrade``, once even when every gunicorn worker starts at the same moment."""
    try:
        with startup_lock(app.instance_path):
            flask_migrate.upgrade()
    except OperationalError as error:
        if not is_transient(error):
            raise  # a migration that fails on a reachable database must stop the start, loudly
        # Start anyway: the health check reports the database, and requests answer 503 until it is back.
        app.logger.error("Database unreachable at start-up; migrations not applied: %s", error)


def create_first_admin(app: Flask) -> None:
    """Create the administrator from ADMIN_* settings, once: only while the database has no users at all."""
    try:
        data = admin_fields(app.config["ADMIN_USERNAME"], app.config["ADMIN_EMAIL"], app.config["ADMIN_PASSWORD"])
    except ValidationError as error:
        raise ConfigError(f"ADMIN_* settings: {describe_validation(error.normalized_messages())}") from None
    try:
        if not schema_exists():
            return  # `flask db upgrade` is about to create it; the next start creates the admin
        if db.session.scalar(select(User.id).limit(1)) is not None:
            return
        create_user(**data, is_admin=True)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # another worker starting at the same time created it first
        return
    except OperationalError as error:
        db.session.rollback()
        if not is_transient(error):
            raise
        app.logger.error("Database unreachable; the first administrator was not created: %s", error)
        return
    if data["password"] == DEFAULT_ADMIN_PASSWORD:
        app.logger.warning(
            "Created the default administrator '%s' with the documented password '%s': change it now.",
            data["username"],
            DEFAULT_ADMIN_PASSWORD,
        )
    else:
        app.logger.warning("Created the first administrator '%s' from ADMIN_* settings.", data["username"])
