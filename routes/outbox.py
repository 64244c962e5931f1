"""The outbox, for administrators: what is waiting to go out, what failed and why, and sending a failed message
again (outbox.py holds the rules)."""

import uuid

from flask import Blueprint, request
from sqlalchemy import select

import outbox
from models import OutboxMessage, db, utcnow
from routes import load_args, no_store, require_login
from routes.errors import APIError
from routes.users import require_admin
from schemas import OutboxMessageSchema, OutboxQuerySchema

bp = Blueprint("outbox", __name__, url_prefix="/api/admin/outbox")
bp.after_request(no_store)
message_schema = OutboxMessageSchema()


@bp.before_request
def require_an_administrator() -> None:
    require_login()  # lets CORS preflights (OPTIONS) through, with no one signed in to check
    if request.method != "OPTIONS":
        require_admin()


@bp.get("")
def list_messages():
    """Administrators: the outbox's messages, newest first, in one state if asked (``?state=failed``: what did not
    go out, with the last error).
    ---
    parameters: [{in: query, schema: OutboxQuerySchema}]
    responses:
      200: {description: The messages., content: {application/json: {schema: OutboxListSchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
      403: {$ref: "#/components/responses/Forbidden"}
    """
    args = load_args(OutboxQuerySchema())
    query = select(OutboxMessage).order_by(OutboxMessage.created_at.desc(), OutboxMessage.id.desc())
    if "state" in args:
        query = query.where(OutboxMessage.state == args["state"])
    messages = db.session.scalars(query.limit(args["limit"]))
    return {"messages": message_schema.dump(messages, many=True)}


@bp.post("/<uuid:message_id>/retry")
def retry_message(message_id: uuid.UUID):
    """Administrators send a failed message again: it is due at once, with its attempts counted afresh.
    ---
    responses:
      200:
        description: The message, pending again.
        content: {application/json: {schema: OutboxMessageResponseSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      409: {$ref: "#/components/responses/Conflict"}
    """
    message = outbox.retry(message_id, utcnow())
    if message is None:
        found = db.get_or_404(OutboxMessage, message_id, description="Outbox message not found.")
        raise APIError(f"Only a failed message can be sent again; this one is {found.state}.", 409)
    db.session.commit()
    return {"message": message_schema.dump(message)}
