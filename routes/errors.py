"""One error shape for everything that can go wrong: ``{"error": sentence, "details": {...}}``."""

from flask import Flask, current_app, g, jsonify, request
from marshmallow import ValidationError
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from models import db

# Werkzeug's stock sentences for these are written for HTML pages; these are for API clients.
HTTP_MESSAGES = {
    404: "Not found: there is no such resource or URL.",
    405: "Method not allowed on this URL.",
    413: "Request body too large: the limit is 1 MB.",
}


class APIError(Exception):
    """An expected failure, answered with ``status`` and the error envelope."""

    def __init__(self, message: str, status: int = 400, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.details = details or {}


def error_response(message: str, status: int, details: dict | None = None):
    response = jsonify(error=message, details=details or {})
    response.status_code = status
    return response


def describe_validation(messages) -> str:
    """A sentence naming every field that failed, for the person in front of the client."""
    if isinstance(messages, dict):
        parts = []
        for field, problems in messages.items():
            first = problems[0] if isinstance(problems, list) and problems else "Invalid value."
            if isinstance(first, str):
                parts.append(first if field == "_schema" else f"{field}: {first}")
            else:
                parts.append(f"{field}: Invalid value.")
        return "Invalid input. " + " ".join(parts)
    return "Invalid input."


def register_error_handlers(app: Flask) -> None:
    """Render every error, the JWT library's included, in the one envelope."""

    @app.errorhandler(APIError)
    def handle_api_error(error: APIError):
        return error_response(error.message, error.status, error.details)

    @app.errorhandler(ValidationError)
    def handle_validation_error(error: ValidationError):
        messages = error.normalized_messages()
        return error_response(describe_validation(messages), 400, messages)

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        default = type(error).description
        message = HTTP_MESSAGES.get(error.code) if error.description == default else None
        response = error_response(message or error.description or error.name, error.code)
        for name, value in error.get_headers():  # keeps Allow on 405, Retry-After on 429
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(IntegrityError)
    def handle_integrity_error(error: IntegrityError):
        db.session.rollback()
        current_app.logger.warning("Integrity error on %s %s: %s", request.method, request.path, error.orig)
        return error_response("The request conflicts with existing data.", 409)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(PoolTimeoutError)
    def handle_database_unavailable(error: Exception):
        db.session.rollback()
        current_app.logger.error(
            "Database unavailable on %s %s (request %s): %s",
            request.method,
            request.path,
            g.get("request_id"),
            error,
        )
        return error_response("The database is unavailable; try again shortly.", 503)

    @app.errorhandler(Exception)
    def handle_unexpected_error(error: Exception):
        db.session.rollback()
        current_app.logger.exception(
            "Unhandled error on %s %s (request %s)", request.method, request.path, g.get("request_id")
        )
        return error_response(
            "Internal server error; the team has been notified.", 500, {"request_id": g.get("request_id")}
        )

    register_jwt_callbacks(app.extensions["flask-jwt-extended"])


def register_jwt_callbacks(jwt) -> None:
    """Flask-JWT-Extended answers 401/422 with ``{"msg"}`` by default; every token problem is a 401 here."""

    @jwt.unauthorized_loader
    def missing_token(reason: str):
        return error_response(
            "Authentication required: send an 'Authorization: Bearer <token>' header.", 401, {"reason": reason}
        )

    @jwt.invalid_token_loader
    def invalid_token(reason: str):
        return error_response("Invalid token: log in again.", 401, {"reason": reason})

    @jwt.expired_token_loader
    def expired_token(_header, _payload):
        return error_response("Token has expired: log in again.", 401)

    @jwt.revoked_token_loader
    def revoked_token(_header, _payload):
        return error_response("Token has been revoked: log in again.", 401)

    @jwt.needs_fresh_token_loader
    def stale_token(_header, _payload):
        return error_response("A fresh login is required for this action.", 401)

    @jwt.token_verification_failed_loader
    def failed_claims(_header, _payload):
        return error_response("Invalid token: log in again.", 401)

    @jwt.user_lookup_error_loader
    def unknown_user(_header, _payload):
        return error_response("This account no longer exists or has been deactivated.", 401)
