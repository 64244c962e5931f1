"""Invitations: an administrator invites someone by email address, and the person invited follows the link to choose
a username and password. The way in with REGISTRATION=invite (production's default), and in every other mode too.

An invitation is a ``one_time_tokens`` row of purpose ``invitation`` (tokens.py): the address, the inviting
administrator, and in ``data`` the role and the name they gave. One address has one live invitation at a time: a new
one revokes the one before, whose link then stops working."""

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Blueprint
from flask_jwt_extended import current_user, jwt_required
from marshmallow import ValidationError
from sqlalchemy import and_, exists, select, text, update
from sqlalchemy.exc import IntegrityError

import outbox
import tokens
from models import OneTimeToken, User, db, utcnow
from routes import load_args, load_json, no_store
from routes.auth import create_user, duplicate_user, email_link, session_response, start_session
from routes.errors import APIError
from routes.users import require_admin
from schemas import (
    AcceptInvitationSchema,
    InvitationCreateSchema,
    InvitationQuerySchema,
    InvitationSchema,
    check_password_policy,
)

bp = Blueprint("invitations", __name__, url_prefix="/api")
bp.after_request(no_store)
invitation_schema = InvitationSchema()

PURPOSE = "invitation"
LIFETIME = timedelta(days=7)
LIFETIME_TEXT = "valid for 7 days"
# One sentence for every token that does not work, so a guess learns nothing about which tokens exist.
INVALID_TOKEN = (
    "This invitation link is not valid: it was used, revoked or replaced, or it expired. Ask an administrator for a "
    "new one."
)


@dataclass(frozen=True)
class Invitation:
    """An invitation as of ``now``, with the administrator who sent it (None once that account is deleted)."""

    token: OneTimeToken
    invited_by: User | None
    now: datetime

    @property
    def id(self) -> uuid.UUID:
        return self.token.id

    @property
    def email(self) -> str:
        return self.token.email

    @property
    def is_admin(self) -> bool:
        return bool((self.token.data or {}).get("is_admin"))

    @property
    def full_name(self) -> str | None:
        return (self.token.data or {}).get("full_name")

    @property
    def created_at(self) -> datetime:
        return self.token.created_at

    @property
    def expires_at(self) -> datetime:
        return self.token.expires_at

    @property
    def accepted_at(self) -> datetime | None:
        return self.token.used_at

    @property
    def revoked_at(self) -> datetime | None:
        return self.token.revoked_at

    @property
    def state(self) -> str:
        if self.token.used_at is not None:
            return "accepted"
        if self.token.revoked_at is not None:
            return "revoked"
        return "expired" if self.token.expires_at <= self.now else "pending"


def in_state(state: str, now: datetime):
    """The SQL condition of ``Invitation.state == state`` at ``now``."""
    unused = and_(OneTimeToken.used_at.is_(None), OneTimeToken.revoked_at.is_(None))
    return {
        "accepted": OneTimeToken.used_at.is_not(None),
        "revoked": and_(OneTimeToken.used_at.is_(None), OneTimeToken.revoked_at.is_not(None)),
        "expired": and_(unused, OneTimeToken.expires_at <= now),
        "pending": and_(unused, OneTimeToken.expires_at > now),
    }[state]


def one_invitation_at_a_time(email: str) -> None:
    """Make invitations to ``email`` wait for each other until this transaction ends, so that of two sent at once the
    second sees and revokes the first. PostgreSQL: an advisory lock named by the address (no row exists to lock before
    the first invitation); SQLite: its write lock, taken when the transaction began, already does it."""
    if db.session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"invitation:{email}".encode()).digest()[:8], "big", signed=True)
        db.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def dump(token: OneTimeToken, invited_by: User | None, now: datetime) -> dict:
    return invitation_schema.dump(Invitation(token, invited_by, now))


@bp.post("/invitations")
@jwt_required()
def create_invitation():
    """Administrators invite someone by email: a link valid for 7 days that creates their account (as an administrator
    if ``is_admin``), in every REGISTRATION mode.

    A pending invitation to the same address is replaced: its link stops working. An address that already has an
    account is a 409.
    ---
    requestBody: {required: true, content: {application/json: {schema: InvitationCreateSchema}}}
    responses:
      201:
        description: The invitation; its email is on its way.
        content: {application/json: {schema: InvitationResponseSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      409: {$ref: "#/components/responses/Conflict"}
    """
    require_admin()
    data = load_json(InvitationCreateSchema())
    email, now = data["email"], utcnow()
    one_invitation_at_a_time(email)
    if db.session.scalar(select(exists().where(User.email == email))):
        raise APIError(
            "An account with this email address already exists.", 409, {"email": ["This email is already registered."]}
        )
    replaced = tokens.revoke(PURPOSE, now, email=email)
    token, raw = tokens.issue(
        PURPOSE,
        email,
        lifetime=LIFETIME,
        now=now,
        created_by_id=current_user.id,
        data={"is_admin": data["is_admin"], "full_name": data["full_name"]},
    )
    payload = {
        "link": email_link("accept-invitation", raw),
        "inviter_name": current_user.full_name,
        "full_name": data["full_name"],
        "is_admin": data["is_admin"],
        "expires_in": LIFETIME_TEXT,
    }
    outbox.add("invitation", email, f"invitation:{token.id}", payload, now)
    db.session.commit()
    message = f"Invitation sent to {email}."
    if replaced:
        message += " It replaces the earlier one, whose link no longer works."
    return {"message": message, "invitation": dump(token, current_user, now)}, 201


@bp.get("/invitations")
@jwt_required()
def list_invitations():
    """Administrators: the invitations, newest first, in one state if asked (``?state=pending``).
    ---
    parameters: [{in: query, schema: InvitationQuerySchema}]
    responses:
      200: {description: The invitations., content: {application/json: {schema: InvitationListSchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
      403: {$ref: "#/components/responses/Forbidden"}
    """
    require_admin()
    args = load_args(InvitationQuerySchema())
    now = utcnow()
    query = (
        select(OneTimeToken, User)
        .outerjoin(User, User.id == OneTimeToken.created_by_id)
        .where(OneTimeToken.purpose == PURPOSE)
        .order_by(OneTimeToken.created_at.desc(), OneTimeToken.id.desc())
    )
    if "state" in args:
        query = query.where(in_state(args["state"], now))
    rows = db.session.execute(query.limit(args["limit"]))
    return {"invitations": [dump(row.OneTimeToken, row.User, now) for row in rows]}


@bp.delete("/invitations/<uuid:invitation_id>")
@jwt_required()
def revoke_invitation(invitation_id: uuid.UUID):
    """Administrators revoke an invitation: its link stops working. Revoking one already revoked or expired is no
    error; an accepted one is a 409 (deactivate the account instead).
    ---
    responses:
      200: {description: Revoked., content: {application/json: {schema: InvitationResponseSchema}}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      409: {$ref: "#/components/responses/Conflict"}
    """
    require_admin()
    now = utcnow()
    this = (OneTimeToken.id == invitation_id, OneTimeToken.purpose == PURPOSE)
    # One conditional UPDATE: of a revocation and an acceptance at once, exactly one wins (see tokens.consume).
    token = db.session.scalars(
        update(OneTimeToken)
        .where(*this, OneTimeToken.used_at.is_(None), OneTimeToken.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(OneTimeToken)
        .execution_options(populate_existing=True)
    ).first() or db.session.scalar(select(OneTimeToken).where(*this))
    if token is None:
        raise APIError("Invitation not found.", 404)
    if token.used_at is not None:
        raise APIError(
            "This invitation was accepted already: to take the account's access away, deactivate it "
            "(PATCH /api/users/<id>).",
            409,
        )
    db.session.commit()
    invited_by = db.session.get(User, token.created_by_id) if token.created_by_id else None
    return {"message": "Invitation revoked: its link no longer works.", "invitation": dump(token, invited_by, now)}


def invalid_invitation() -> APIError:
    return APIError(INVALID_TOKEN, 400, {"token": ["Not a valid invitation token."]})


@bp.post("/auth/accept-invitation")
def accept_invitation():
    """Accept an invitation: the account is created with the invited address (verified) and role, and signed in.

    Works in every REGISTRATION mode. The link's token works once; an unknown, used, revoked, replaced or expired one
    is a 400 (one message for all). So is one whose administrator is no longer an active administrator, deactivated,
    demoted or deleted since (an invitation is only as good as the administrator behind it): trying it revokes it.
    A taken username is a 409, and the token stays usable.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: AcceptInvitationSchema}}}
    responses:
      201:
        description: The account and a new session's tokens.
        content: {application/json: {schema: SessionSchema}}
      409: {$ref: "#/components/responses/Conflict"}
    """
    data = load_json(AcceptInvitationSchema())
    now = utcnow()
    # Read first, to check the password against the invited address and the name; consume() below decides.
    invitation = tokens.find(PURPOSE, data["token"], now)
    if invitation is None:
        raise invalid_invitation()
    email, invited = invitation.email, invitation.data or {}
    full_name = data.get("full_name") or invited.get("full_name")
    if not full_name:
        raise ValidationError("Missing data for required field.", "full_name")
    check_password_policy(data["password"], data["username"], email)
    token = tokens.consume(PURPOSE, data["token"], now)
    if token is None:  # used, or revoked, since it was read
        raise invalid_invitation()
    # The inviter must still be an active administrator: read after consume(), in its transaction, without a lock.
    # Deactivating or demoting them (PATCH /api/users/<id>) revokes their pending invitations with a conditional
    # UPDATE of these same rows, so that and consume() wait for each other: if the revocation came first, consume()
    # found the token revoked; if consume() came first, the demotion waits for this transaction, then leaves the used
    # token alone, and this acceptance counts as made before it (the read below sees the inviter as committed: still
    # an administrator). A lock on the inviter's row would add nothing and deadlock (FOR SHARE waits for the demotion,
    # which holds that row while it waits for this token); FOR KEY SHARE would not wait for it at all. What no
    # revocation covers (an inviter deleted, so ``created_by_id`` is null, or demoted outside the API) is seen here
    # once committed. SQLite runs one writer at a time, so there the two simply come one after the other.
    inviter_is_admin = exists().where(User.id == token.created_by_id, User.is_active, User.is_admin)
    if not db.session.scalar(select(inviter_is_admin)):
        token.used_at, token.revoked_at = None, now  # never to be accepted: listed as revoked, not pending
        db.session.commit()
        raise invalid_invitation()
    user = create_user(data["username"], email, data["password"], full_name, bool(invited.get("is_admin")))
    user.email_verified_at = now  # the link reached the address
    try:
        db.session.flush()
    except IntegrityError:
        # The rollback puts the token back: a taken username can be changed and the same link used again.
        db.session.rollback()
        raise duplicate_user(data["username"], email) from None
    session_tokens = start_session(user)
    db.session.commit()
    return session_response("Invitation accepted: welcome.", user, session_tokens), 201
