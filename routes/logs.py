"""Logs: one line per request (method, path, status, duration, user id, request id), JSON in production
(python-json-logger) or plain text, and every line said during a request stamped with that request's id.
Passwords are never logged, and tokens or password hashes that find their way into a message are masked."""

import logging
import re
import time
import uuid

from flask import Flask, g, has_request_context, request
from flask_jwt_extended import get_jwt_identity
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] [%(request_id)s] %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"levelname": "level", "name": "logger"}
HANDLER_NAME = "finstack"
# What must never reach a log: bearer tokens and JWTs (three base64url parts, the first a JSON header), and
# Werkzeug password hashes. Whatever logs them by mistake (a library's message, a traceback) is masked.
SECRETS = re.compile(
    r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]+"
    r"|eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?:pbkdf2|scrypt):[A-Za-z0-9:]+\$[^\s\"']+"
)
# And the value of anything called a password, secret or token ("password=...", "'new_password': '...'").
NAMED_SECRETS = re.compile(r"""(?i)((?:password|passwd|secret|token)[\w-]*["']?\s*[:=]\s*["']?)[^\s"',;}&]+""")
MASK = "[redacted]"
request_log = logging.getLogger("finstack.request")


def masked(text: str) -> str:
    return NAMED_SECRETS.sub(rf"\1{MASK}", SECRETS.sub(MASK, text))


class MaskedTextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return masked(super().format(record))


class MaskedJsonFormatter(JsonFormatter):
    def process_log_record(self, log_data: dict) -> dict:
        # Masked field by field, before JSON escaping would hide the quotes the patterns look for.
        return {key: masked(value) if isinstance(value, str) else value for key, value in log_data.items()}


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return MaskedJsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, timestamp="time")  # ISO 8601, UTC
    return MaskedTextFormatter(TEXT_FORMAT, defaults={"request_id": "-"})  # "-": said outside any request


def stamp_request_ids() -> None:
    """Give each record made while a request is handled that request's id, whichever logger or handler."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "stamps_request_ids", False):
        return

    def record_with_request_id(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if has_request_context() and "request_id" in g:
            record.request_id = g.request_id
        return record

    record_with_request_id.stamps_request_ids = True
    logging.setLogRecordFactory(record_with_request_id)


def configure_logging(app: Flask) -> None:
    """Log to stderr at LOG_LEVEL in LOG_FORMAT, unless a test runner has set logging up already; under
    gunicorn, its own lines (workers starting, exiting) take the same format."""
    stamp_request_ids()
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if handler.get_name() == HANDLER_NAME]
    if root.handlers and not ours:
        return  # pytest's capture, or an embedding program's own set-up
    handler = ours[0] if ours else logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter(app.config["LOG_FORMAT"]))
    if not ours:
        root.addHandler(handler)
    root.setLevel(app.config["LOG_LEVEL"])
    for gunicorn_handler in logging.getLogger("gunicorn.error").handlers:
        gunicorn_handler.setFormatter(handler.formatter)


def caller_id() -> str | None:
    """The signed-in user's id, when this request presented a token that was accepted."""
    try:
        return get_jwt_identity()
    except RuntimeError:  # no token was checked for this request
        return None


def register_request_logging(app: Flask) -> None:
    """Give every request an id (the caller's ``X-Request-ID`` when sane), echo it, and log one line for it.
    Registered before every other hook, so the line covers refusals by the hooks after it (429, 415) too."""

    @app.before_request
    def start_request():
        g.request_started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex

    @app.after_request
    def log_request(response):
        if "request_id" not in g:
            return response
        response.headers["X-Request-ID"] = g.request_id
        duration_ms = round((time.perf_counter() - g.request_started) * 1000, 2)
        user_id = caller_id()
        request_log.log(
            logging.WARNING if response.status_code >= 500 else logging.INFO,
            "%s %s %s %.2f ms user %s",
            request.method,
            request.path,
            response.status_code,
            duration_ms,
            user_id or "-",
            extra={
                "method": request.method,
                "path": request.path,  # the query string stays out: cursors and filters are not for logs
                "status": response.status_code,
                "duration_ms": duration_ms,
                "user_id": user_id,
                "remote_addr": request.remote_addr,
            },
        )
        return response
