"""One error shape for everything that can go wrong: ``{"error": sentence, "details": {...}}``."""

import math
import sqlite3
import time
from functools import partial

from flask import Flask, current_app, g, jsonify, request
from flask_limiter import RateLimitExceeded
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm.exc import StaleDataError
from werkzeug.exceptions import HTTPException

from models import db

try:  # a chunked body gunicorn finds broken only while the app reads it; not there under `python app.py`
    from gunicorn.http.errors import ParseException as MalformedBody
except ImportError:  # gunicorn does not install on every platform
    MalformedBody = None

# Werkzeug's stock sentences for these are written for HTML pages; these are for API clients.
HTTP_MESSAGES = {
    404: "Not found: there is no such resource or URL.",
    405: "Method not allowed on this URL.",
    413: "Request body too large: the limit is 1 MB.",
}
# PostgreSQL error classes that mean "try again later" rather than "this request is wrong":
# connection exceptions, transaction rollbacks (deadlock, serialization), resources, operator intervention.
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")
TRANSIENT_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")
NAMED_FIELDS = 5
TOKEN_REVOKED = "Token has been revoked: log in again."
ACCOUNT_GONE = "This account no longer exists or has been deactivated."
# Retry-After of a 503 (the database out of reach or busy): a client should come back soon, not in a minute.
RETRY_UNAVAILABLE_AFTER = 5


class APIError(Exception):
    """An expected failure, answered with ``status`` and the error envelope."""

    def __init__(self, message: str, status: int = 400, details: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.details = details or {}
        self.headers = headers or {}


class RateLimited(APIError):
    """A 429. Every one has the same details, ``{"retry_after": seconds, "limit": "5 per 15 minutes"}``, and
    ``Retry-After`` with the same seconds, whichever limit it comes from."""

    def __init__(self, message: str, retry_after: float, limit: str):
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, 429, {"retry_after": seconds, "limit": limit}, {"Retry-After": str(seconds)})


def describe_limit(item) -> str:
    """A rate limit item (``limits``) as people write it: "5 per 15 minutes", "10 per minute", "100 per hour"."""
    seconds = item.get_expiry()
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds % size == 0:
            count = seconds // size
            return f"{item.amount} per {name}" if count == 1 else f"{item.amount} per {count} {name}s"
    return f"{item.amount} per {seconds} seconds"  # not reached: every item is a whole number of seconds


def error_response(message: str, status: int, details: dict | None = None, headers: dict | None = None):
    response = jsonify(error=message, details=details or {})
    response.status_code = status
    response.headers.update(headers or {})
    if status in (429, 503):  # the limiter rewrites Retry-After after this: limits.retry_after_only_when_due restores
        g.retry_after = response.headers.get("Retry-After")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="FinStack Tasks"'  # RFC 6750
    return response


def printable(name):
    """A field name as valid Unicode, whatever the client sent: lone surrogates become U+FFFD."""
    if not isinstance(name, str):
        return name
    return "".join("\ufffd" if "\ud800" <= character <= "\udfff" else character for character in name)


def describe_validation(messages) -> str:
    """A sentence naming the fields that failed (the first few), for the person in front of the client."""
    if not isinstance(messages, dict):
        return "Invalid input."
    parts = []
    for field, problems in list(messages.items())[:NAMED_FIELDS]:
        first = problems[0] if isinstance(problems, list) and problems else None
        if not isinstance(first, str):
            first = "Invalid value."
        parts.append(first if field == "_schema" else f"{field}: {first}")
    if len(messages) > NAMED_FIELDS:
        parts.append(f"({len(messages) - NAMED_FIELDS} more in details.)")
    return "Invalid input. " + " ".join(parts)


def is_transient(error: Exception) -> bool:
    """Is this database error the database being out of reach or busy, rather than a fault in a statement?"""
    if isinstance(error, PoolTimeoutError | InterfaceError) or getattr(error, "connection_invalidated", False):
        return True
    if not isinstance(error, OperationalError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        return getattr(error.orig, "sqlite_errorname", "") in TRANSIENT_SQLITE_ERRORS
    sqlstate = getattr(error.orig, "pgcode", None)
    return sqlstate is None or sqlstate.startswith(TRANSIENT_SQLSTATE_CLASSES)  # no SQLSTATE: no server answer


def is_schema_missing(error: Exception) -> bool:
    """Has nobody run the migrations on this database yet?"""
    original = getattr(error, "orig", None)
    if isinstance(original, sqlite3.OperationalError):
        return str(original).startswith("no such table")
    return getattr(original, "pgcode", None) == "42P01"  # undefined_table


def register_error_handlers(app: Flask) -> None:
    """Render every error, the JWT library's included, in the one envelope."""

    @app.errorhandler(APIError)
    def handle_api_error(error: APIError):
        return error_response(error.message, error.status, error.details, error.headers)

    @app.errorhandler(ValidationError)
    def handle_validation_error(error: ValidationError):
        messages = {printable(field): problems for field, problems in error.normalized_messages().items()}
        return error_response(describe_validation(messages), 400, messages)

    @app.errorhandler(RateLimitExceeded)
    def handle_rate_limited(error: RateLimitExceeded):
        current_app.logger.warning(
            "Rate limit %s exceeded on %s %s from %s",
            error.limit.limit,
            request.method,
            request.path,
            request.remote_addr,
        )
        message = (
            error.description if error.limit.error_message else "Too many requests: slow down and try again later."
        )
        retry_after = error.limit.limit.get_expiry()  # the longest it can be
        limiter = current_app.extensions.get("rate_limiter")
        try:
            if limiter and limiter.current_limit:
                retry_after = limiter.current_limit.window.reset_time - time.time()
        except Exception:  # the store failed after refusing this request: still a 429, with the limit's whole window
            current_app.logger.warning("Rate-limit store unreachable: Retry-After is the limit's whole window")
        return handle_api_error(RateLimited(message, retry_after, describe_limit(error.limit.limit)))

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        default = type(error).description
        message = HTTP_MESSAGES.get(error.code) if error.description == default else None
        response = error_response(message or error.description or error.name, error.code)
        for name, value in error.get_headers():  # keeps Allow on 405
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(IntegrityError)
    def handle_integrity_error(error: IntegrityError):
        db.session.rollback()
        current_app.logger.warning("Integrity error on %s %s: %s", request.method, request.path, error.orig)
        return error_response("The request conflicts with existing data.", 409)

    @app.errorhandler(StaleDataError)
    def handle_vanished_row(error: StaleDataError):
        db.session.rollback()  # another request deleted the row this one was changing
        return error_response("Not found: it was deleted while this request was changing it.", 404)

    @app.errorhandler(DBAPIError)
    @app.errorhandler(PoolTimeoutError)
    def handle_database_error(error: DBAPIError | PoolTimeoutError):
        if is_transient(error):
            problem, message = "unavailable", "The database is unavailable or busy; try again shortly."
        elif is_schema_missing(error):
            problem, message = "not migrated (run `flask db upgrade`)", "The database is not ready; try again shortly."
        else:
            return handle_unexpected_error(error)
        db.session.rollback()
        current_app.logger.error(
            "Database %s on %s %s from %s (request %s): %s",
            problem, request.method, request.path, request.remote_addr, g.get("request_id"), error,
        )  # fmt: skip
        return error_response(message, 503, headers={"Retry-After": str(RETRY_UNAVAILABLE_AFTER)})

    if MalformedBody is not None:

        @app.errorhandler(MalformedBody)
        def handle_malformed_body(error: Exception):
            current_app.logger.info("Malformed request body: %s", error)
            return error_response("The request body is not valid HTTP: its chunked encoding is broken.", 400)

    @app.errorhandler(Exception)
    def handle_unexpected_error(error: Exception):
        db.session.rollback()
        current_app.logger.error(
            "Unhandled error on %s %s from %s (request %s)",
            request.method, request.path, request.remote_addr, g.get("request_id"), exc_info=error,
        )  # fmt: skip
        return error_response(
            "Internal server error; quote the request_id when you report it.", 500, {"request_id": g.get("request_id")}
        )

    register_jwt_callbacks(app.extensions["flask-jwt-extended"])

    @app.teardown_appcontext
    def end_session(_error):
        """Hand the connection back even when the database died under the request: a ROLLBACK that fails here
        must not turn a request already answered into the server's own HTML 500 (this runs before
        Flask-SQLAlchemy's own teardown, which then has nothing left to do)."""
        try:
            db.session.remove()
        except SQLAlchemyError as error:
            current_app.logger.warning(
                "Ending the database session failed (request %s): %s", g.get("request_id"), error
            )


def token_rejected(message: str, _header: dict, _payload: dict):
    return error_response(message, 401)


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

    for register, message in (
        (jwt.expired_token_loader, "Token has expired: log in again."),
        (jwt.revoked_token_loader, TOKEN_REVOKED),
        (jwt.needs_fresh_token_loader, "A fresh login is required for this action."),
        (jwt.token_verification_failed_loader, "Invalid token: log in again."),
        (jwt.user_lookup_error_loader, ACCOUNT_GONE),
    ):
        register(partial(token_rejected, message))
