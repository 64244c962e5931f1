"""Health for load balancers and people: liveness (is the app up, does its database answer?) and readiness
(is the database's schema the one this code needs?)."""

from alembic.script import ScriptDirectory
from flask import Blueprint, current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from models import db, utcnow
from routes.errors import is_schema_missing

bp = Blueprint("health", __name__, url_prefix="/api/health")


def unavailable(body: dict, problem: str, message: str, **extra) -> tuple[dict, int]:
    """The 503 body: the health fields and the error envelope together."""
    return {**body, "status": "unavailable", "database": problem, **extra, "error": message, "details": {}}, 503


@bp.get("")
def health():
    """200 when the database answers, 503 (with the error envelope) when it does not.

    One cheap statement: this is what load balancers poll.
    ---
    security: []
    responses:
      200: {description: Up with its database., content: {application/json: {schema: HealthSchema}}}
      503: {description: The database is unreachable., content: {application/json: {schema: HealthUnavailableSchema}}}
    x-not: [429]
    """
    body = {"timestamp": utcnow().isoformat(), "version": current_app.config["VERSION"]}
    try:
        db.session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        db.session.rollback()
        current_app.logger.error("Health check: database unreachable: %s", error)
        return unavailable(body, "unavailable", "The database is unavailable.")
    return {**body, "status": "ok", "database": "ok"}


def migration_heads() -> set[str]:
    """The revisions the migrations end at, read from migrations/ once per app."""
    heads = current_app.extensions.get("migration_heads")
    if heads is None:
        config = current_app.extensions["migrate"].migrate.get_config()
        heads = current_app.extensions["migration_heads"] = set(ScriptDirectory.from_config(config).get_heads())
    return heads


@bp.get("/ready")
def ready():
    """200 when the database answers and its schema is at the latest migration, 503 otherwise.

    For deploys and orchestrators: an instance is ready for traffic only once `flask db upgrade` has run.
    ---
    security: []
    responses:
      200: {description: Ready for traffic., content: {application/json: {schema: ReadySchema}}}
      503:
        description: The database is unreachable or not migrated.
        content: {application/json: {schema: ReadyUnavailableSchema}}
    x-not: [429]
    """
    body = {"timestamp": utcnow().isoformat(), "version": current_app.config["VERSION"]}
    expected = migration_heads()
    try:
        current = set(db.session.scalars(text("SELECT version_num FROM alembic_version")))
    except SQLAlchemyError as error:
        db.session.rollback()
        if is_schema_missing(error):
            return unavailable(body, "not migrated", "The database has no schema yet: run `flask db upgrade`.")
        current_app.logger.error("Readiness check: database unreachable: %s", error)
        return unavailable(body, "unavailable", "The database is unavailable.")
    migration = {"current": sorted(current), "expected": sorted(expected)}
    if current != expected:
        return unavailable(
            body, "not migrated", "The database is not at the latest migration: run `flask db upgrade`.",
            migration=migration,
        )  # fmt: skip
    return {**body, "status": "ready", "database": "ok", "migration": migration}
