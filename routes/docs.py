"""The API described: an OpenAPI document built from the routes and the marshmallow schemas that validate them,
and Swagger UI (from flask-swagger-ui's bundled assets) to read and try it in a browser."""

import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.yaml_utils import load_yaml_from_docstring
from flask import Blueprint, Flask, current_app
from flask_swagger_ui import get_swaggerui_blueprint
from werkzeug.routing import Rule

from routes import WRITES

bp = Blueprint("docs", __name__, url_prefix="/api")

OPENAPI_URL = "/api/openapi.json"
DOCS_URL = "/api/docs"
# The docs page runs Swagger UI's own inline start-up script and styles, and calls only this origin.
DOCS_CSP = {
    "default-src": "'self'",
    "script-src": ["'self'", "'unsafe-inline'"],
    "style-src": ["'self'", "'unsafe-inline'"],
    "img-src": ["'self'", "data:"],
    "connect-src": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "form-action": "'none'",
}
# The docs page and its assets are a rendering of the document, not part of the API it describes.
NOT_DESCRIBED = {"swagger_ui.show"}
BEARER = "bearerAuth"
REFRESH_BEARER = "refreshToken"
METRICS_BEARER = "metricsToken"
TAGS = [
    {"name": "auth", "description": "Log in, keep a session going with refresh tokens, log out."},
    {
        "name": "accounts",
        "description": "Account changes confirmed by email: a forgotten password's reset, a new email address.",
    },
    {"name": "users", "description": "Profiles, the assignment list, and administration of accounts."},
    {"name": "tasks", "description": "Calls, meetings and follow-ups logged against client entities."},
    {"name": "analytics", "description": "The dashboard's figures."},
    {
        "name": "outbox",
        "description": "Administrators: the email waiting to go out, what failed, and sending it again.",
    },
    {
        "name": "invitations",
        "description": "Administrators invite people by email; the person invited accepts and has an account.",
    },
    {"name": "health", "description": "Liveness and readiness for load balancers, and metrics for Prometheus."},
    {"name": "docs", "description": "This document."},
]
# Every error has the same body; these are the answers operations share, by status.
ERRORS = {
    400: ("BadRequest", "Bad input: not a JSON object, or a field or parameter failed validation (see details)."),
    401: ("Unauthorized", "Missing, malformed, expired or revoked token, or wrong credentials."),
    403: ("Forbidden", "Authenticated, but not allowed to do this."),
    404: ("NotFound", "No such resource."),
    409: ("Conflict", "Conflicts with existing data (a duplicate, or the last active administrator)."),
    412: ("PreconditionFailed", "If-Match names another version: details.task is the task as it is now."),
    413: ("PayloadTooLarge", "The request body is over 1 MB."),
    422: ("KeyReused", "This Idempotency-Key was used for another request in the last 24 hours."),
    429: ("TooManyRequests", "Rate limited: wait for Retry-After seconds (details: retry_after, the same, and limit)."),
    503: ("Unavailable", "The database is unavailable or busy: try again after Retry-After seconds (5)."),
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "The Bearer scheme (RFC 6750).", "schema": {"type": "string"}}},
    429: {
        "Retry-After": {"description": "Seconds to wait.", "required": True, "schema": {"type": "integer"}},
    },
    503: {
        "Retry-After": {"description": "Seconds to wait (5).", "required": True, "schema": {"type": "integer"}},
    },
}
# Request headers some operations honour, and the response header that goes with If-Match.
HEADER_PARAMETERS = {
    "IfMatch": {
        "in": "header",
        "name": "If-Match",
        "required": False,
        "schema": {"type": "string", "example": '"3"'},
        "description": "The ETag (version) you read: a 412 if the task has changed since. Without it, the last "
        "write wins.",
    },
    "IfNoneMatch": {
        "in": "header",
        "name": "If-None-Match",
        "required": False,
        "schema": {"type": "string", "example": '"3f2a9c0d1e4b5a6978c8d7e6f5a4b3c2d1e0f9a8"'},
        "description": "The ETag of the answer you hold (for the same query): a 304 without a body if it is unchanged.",
    },
    "IdempotencyKey": {
        "in": "header",
        "name": "Idempotency-Key",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
        "description": "Any unique string, a UUID say: a retry with the same key and body gets the first response "
        "(with Idempotent-Replayed: true) and changes nothing; the same key with another body is a 422. Kept for "
        "24 hours.",
    },
}
ETAG_HEADER = {"description": "The task's version, quoted: send it back as If-Match.", "schema": {"type": "string"}}
CONVERTERS = {"uuid": {"type": "string", "format": "uuid"}, "int": {"type": "integer"}}
RULE_ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")


def shared_response(status: int) -> dict:
    return {"$ref": f"#/components/responses/{ERRORS[status][0]}"}


def openapi_path(rule: Rule) -> str:
    """``/api/tasks/<uuid:task_id>`` as OpenAPI writes it: ``/api/tasks/{task_id}``."""
    return RULE_ARGUMENT.sub(r"{\g<name>}", rule.rule)


def path_parameters(rule: Rule) -> list[dict]:
    return [
        {
            "in": "path",
            "name": match["name"],
            "required": True,
            "schema": CONVERTERS.get(match["converter"], {"type": "string"}),
        }
        for match in RULE_ARGUMENT.finditer(rule.rule)
    ]


def describe_operation(rule: Rule, view) -> dict:
    """The operation from the view's docstring: the first paragraph is the summary, the prose after it the
    description, and the YAML after ``---`` the rest. Answers every operation shares are added here: 401
    where a token is needed, 400 and 413 where there is a body, 400 on every write, 429 and 503, unless
    ``x-not`` lists them."""
    text = (view.__doc__ or "").split("---")[0].strip()
    summary, _, description = text.partition("\n\n")
    operation = load_yaml_from_docstring(view.__doc__ or "")
    if not operation:
        return {}
    operation = {
        "operationId": rule.endpoint.replace(".", "_"),
        "summary": " ".join(summary.split()),
        "tags": [rule.endpoint.partition(".")[0]],
        **({"description": " ".join(description.split())} if description.strip() else {}),
        **operation,
    }
    responses = operation.setdefault("responses", {})
    shared = {429, 503}
    if operation.get("security") != []:
        shared.add(401)
    if "requestBody" in operation:
        shared |= {400, 413}
    if rule.methods & set(WRITES):
        shared.add(400)  # a body declared as anything but JSON
    for status in sorted(shared - set(responses) - set(operation.pop("x-not", []))):
        responses[status] = shared_response(status)
    operation["responses"] = dict(sorted(responses.items()))
    return operation


def build_spec(app: Flask) -> dict:
    """The OpenAPI 3.0.3 document for every route of ``app`` (without ``servers``)."""
    spec = APISpec(
        title="FinStack Tasks API",
        version=app.config["VERSION"],
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Tasks (calls, meetings, follow-ups) logged against client entities. Every error is "
            '`{"error": "<sentence>", "details": {...}}`. Log in with `POST /api/auth/login`, then send '
            "`Authorization: Bearer <access_token>`.",
        },
        tags=TAGS,
        security=[{BEARER: []}],
    )
    for name, token in ((BEARER, "An access token."), (REFRESH_BEARER, "A refresh token.")):
        spec.components.security_scheme(
            name, {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": token}
        )
    spec.components.security_scheme(
        METRICS_BEARER, {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN, when it is set."}
    )
    for name, parameter in HEADER_PARAMETERS.items():
        spec.components.parameter(name, parameter["in"], parameter)
    spec.components.header("ETag", ETAG_HEADER)
    for status, (name, description) in ERRORS.items():
        response = {"description": description, "content": {"application/json": {"schema": "ErrorSchema"}}}
        if status in ERROR_HEADERS:
            response["headers"] = ERROR_HEADERS[status]
        spec.components.response(name, response)
    for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
        if rule.endpoint in NOT_DESCRIBED:
            continue
        operation = describe_operation(rule, app.view_functions[rule.endpoint])
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        spec.path(
            path=openapi_path(rule),
            operations={method.lower(): operation for method in methods if operation},
            parameters=path_parameters(rule),
        )
    return spec.to_dict()


def openapi_document(app: Flask, server: str) -> dict:
    """The document, built once per app, with ``server`` as the base URL clients call."""
    if "openapi" not in app.extensions:
        app.extensions["openapi"] = build_spec(app)
    return {**app.extensions["openapi"], "servers": [{"url": server}]}


def swagger_ui_blueprint() -> Blueprint:
    """Swagger UI at /api/docs, from the package's bundled assets; it calls nothing outside (no validator)."""
    return get_swaggerui_blueprint(
        DOCS_URL,
        OPENAPI_URL,
        config={"app_name": "FinStack Tasks API", "validatorUrl": None, "displayRequestDuration": True},
    )


@bp.get("/openapi.json")
def openapi():
    """This API's OpenAPI document; its server is relative: the host it was fetched from.
    ---
    security: []
    responses:
      200:
        description: An OpenAPI 3.0.3 document.
        content:
          application/json:
            schema: {type: object}
    x-not: [503]
    """
    return openapi_document(current_app, "/")  # not the Host header, which the client controls
