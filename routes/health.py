"""Liveness for load balancers and people: is the app up, and can it reach its database?"""

from flask import Blueprint, current_app
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from models import db, utcnow

bp = Blueprint("health", __name__, url_prefix="/api/health")


@bp.get("")
def health():
    """200 when the database answers, 503 (with the error envelope) when it does not.
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
        return {
            **body,
            "status": "unavailable",
            "database": "unavailable",
            "error": "The database is unavailable.",
            "details": {},
        }, 503
    return {**body, "status": "ok", "database": "ok"}
