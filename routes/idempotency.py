"""``Idempotency-Key``: a write retried with the same key and body is answered with its first response, once.

A view that accepts a key calls ``replay_or_claim()`` once its input is valid, and ``remember(response)`` just
before its commit. The claim is a row inserted in the request's own transaction: a concurrent retry's INSERT waits
on it (PostgreSQL's unique index; SQLite has one writer at a time), then finds the committed response, or nothing
if the first attempt failed and rolled back, in which case the retry does the work itself. Only successes are
kept: a request that fails leaves no trace of its key.
"""

import hashlib
import json
import re
from datetime import timedelta

from flask import Response, current_app, g, request
from flask_jwt_extended import get_current_user
from sqlalchemy import delete, select, update

from models import IdempotencyKey, db, insert, utcnow
from routes.errors import APIError

HEADER = "Idempotency-Key"
KEY_FORMAT = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as the IETF draft's examples and Stripe's keys
LIFETIME = timedelta(hours=24)
KEPT_HEADERS = ("ETag",)  # beside the status and the body, replayed as first sent


def request_fingerprint() -> str:
    """The method, the path and the JSON body (keys sorted, so the same object in another order matches)."""
    body = json.dumps(request.get_json(silent=True), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode("utf-8", "surrogatepass")).hexdigest()


def replay_or_claim():
    """None when the request has no key or has just claimed it; the first response when it is a retry."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not KEY_FORMAT.fullmatch(key):
        raise APIError(
            f"Not a usable {HEADER}: send 1 to 255 visible ASCII characters, a UUID for instance.",
            details={HEADER: ["1 to 255 characters from '!' to '~', no spaces."]},
        )
    user_id, fingerprint, now = get_current_user().id, request_fingerprint(), utcnow()
    this_key = (IdempotencyKey.user_id == user_id) & (IdempotencyKey.key == key)
    db.session.execute(delete(IdempotencyKey).where(this_key, IdempotencyKey.expires_at <= now))
    claim = (
        insert(IdempotencyKey)
        .values(user_id=user_id, key=key, request_hash=fingerprint, created_at=now, expires_at=now + LIFETIME)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    )
    if db.session.execute(claim).first() is not None:
        g.idempotency_key = this_key
        return None
    # Committed by the first request (had it rolled back, the claim above would have succeeded)...
    first = db.session.execute(
        select(IdempotencyKey.request_hash, IdempotencyKey.status_code, IdempotencyKey.response).where(this_key)
    ).one_or_none()
    if first is None:  # ...unless it expired and was purged in between: then this request is the first
        return replay_or_claim()
    if first.request_hash != fingerprint:
        raise APIError(
            f"This {HEADER} was already used for a different request: send a new key for a new request.",
            422,
            {HEADER: ["Already used with another method, URL or body in the last 24 hours."]},
        )
    response = current_app.json.response(first.response["body"])
    response.status_code = first.status_code
    response.headers.update(first.response["headers"])
    response.headers["Idempotent-Replayed"] = "true"
    return response


def remember(response: Response) -> Response:
    """Keep the response of a request that claimed a key, in its transaction: call it just before the commit."""
    this_key = g.pop("idempotency_key", None)
    if this_key is not None:
        kept = {
            "body": response.get_json(),
            "headers": {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers},
        }
        db.session.execute(
            update(IdempotencyKey).where(this_key).values(status_code=response.status_code, response=kept)
        )
    return response
