"""Blueprints, one module per area, and the request helpers they share."""

import orjson
from flask import current_app, request
from flask.json.provider import DefaultJSONProvider
from flask_jwt_extended import verify_jwt_in_request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from routes.errors import APIError


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, encoded by orjson: the same text as Flask's own encoder gives (keys sorted, dates as Flask
    writes them), but UTF-8 rather than ``\\u`` escapes, at several times the speed. What orjson cannot encode (an
    integer past 64 bits, text with a lone surrogate) is left to Flask's encoder. Reading stays Flask's."""

    OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def dumps(self, obj, **kwargs) -> str:
        if kwargs:  # options for Flask's encoder (indent, separators, ...): Flask's encoder
            return super().dumps(obj, **kwargs)
        return self.encode(obj).decode()

    def encode(self, obj, indent: bool = False) -> bytes:
        try:
            return orjson.dumps(obj, default=self.default, option=self.OPTIONS | (orjson.OPT_INDENT_2 if indent else 0))
        except TypeError:
            return super().dumps(obj, indent=2 if indent else None).encode()

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        text = self.encode(obj, indent=self._app.debug) + b"\n"
        return self._app.response_class(text, mimetype=self.mimetype)


def load_json(schema: Schema) -> dict:
    """Validate the request's JSON object with ``schema``; anything that is not a JSON object is a 400."""
    if not request.is_json:
        raise APIError("Send a JSON object with the header 'Content-Type: application/json'.")
    body = request.get_data()
    # Werkzeug cuts a streamed (chunked) body at the limit without a word: one more byte means too large.
    streamed_past_limit = request.content_length is None and len(body) >= current_app.config["MAX_CONTENT_LENGTH"]
    if streamed_past_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    try:
        data = current_app.json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise APIError("The request body is not valid JSON.", details={"body": [str(error)[:200]]}) from error
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    return schema.load(data)


def load_args(schema: Schema) -> dict:
    """Validate the query string with ``schema``; a parameter given twice is ambiguous, so a 400."""
    repeated = [name for name, values in request.args.lists() if len(values) > 1]
    if repeated:
        raise ValidationError({name: ["Give this parameter only once."] for name in repeated})
    return schema.load(request.args.to_dict())


WRITES = ("POST", "PUT", "PATCH")


def refuse_other_content_types() -> None:
    """``before_request`` for the whole app: it speaks JSON only, so a write whose body is declared as anything
    else (a form, text, a multipart upload) is turned down before any view acts on it. Reads, deletes and
    preflights carry no body; what they declare is ignored."""
    if request.method in WRITES and request.headers.get("Content-Type") is not None and not request.is_json:
        raise APIError(
            "This API accepts JSON only: send 'Content-Type: application/json', or no Content-Type without a body.",
            details={"Content-Type": [f"Not accepted: {request.headers['Content-Type'][:100]!r}."]},
        )


# gunicorn.conf.py puts the worker's heartbeat here. A sync worker that sends nothing back to gunicorn for its
# ``timeout`` is killed as stuck; a long response that is making progress (the CSV export) says so at each step.
heartbeat = None


def still_working() -> None:
    """Tell the server this request is making progress (nothing to do outside gunicorn)."""
    if heartbeat is not None:
        heartbeat()


def unless_unchanged(response):
    """``response`` (a 200 with its ETag set) for a polling client: a browser may keep it but asks each time
    (``private, no-cache``), and when If-None-Match names that ETag (weak comparison, as RFC 9110 has it), a 304
    with the same ETag and headers and no body. Only If-None-Match is honoured: Werkzeug's make_conditional would
    also answer a GET's If-Match with a 412 carrying the whole answer as its body."""
    response.headers["Cache-Control"] = "private, no-cache"
    etag, _weak = response.get_etag()
    if etag is not None and request.if_none_match.contains_weak(etag):
        response.status_code = 304
        response.set_data(b"")
        for header in ("Content-Type", "Content-Length"):
            response.headers.pop(header, None)
    return response


def require_login() -> None:
    """``before_request`` guard for blueprints where every endpoint needs a valid access token."""
    verify_jwt_in_request()  # lets CORS preflights (OPTIONS) through by itself


def no_store(response):
    """``after_request`` for blueprints that answer with tokens or personal details: no cache may keep them."""
    response.headers["Cache-Control"] = "no-store"
    return response
