"""People: the assignment list, one's own profile, and the administrators' account controls."""

import uuid

from flask import Blueprint
from flask_jwt_extended import current_user
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

import tokens
from models import LoginSession, User, db, utcnow
from routes import load_args, load_json, no_store, require_login
from routes.auth import create_user, duplicate_user, end_sessions
from routes.errors import APIError
from schemas import ProfileSchema, UserAdminSchema, UserCreateSchema, UserQuerySchema, UserSchema

bp = Blueprint("users", __name__, url_prefix="/api/users")
bp.before_request(require_login)
bp.after_request(no_store)
user_schema = UserSchema()


def require_admin() -> None:
    if not current_user.is_admin:
        raise APIError("Only an administrator can do this.", 403)


@bp.get("")
def list_users():
    """Active users by name, for the assignment drop-down; administrators may ask for inactive ones too.
    ---
    parameters: [{in: query, schema: UserQuerySchema}]
    responses:
      200: {description: The users., content: {application/json: {schema: UserListSchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
      403: {$ref: "#/components/responses/Forbidden"}
    """
    args = load_args(UserQuerySchema())
    stmt = select(User).order_by(func.lower(User.full_name), User.full_name, User.username)
    if args["include_inactive"]:
        require_admin()
    else:
        stmt = stmt.where(User.is_active)
    return {"users": user_schema.dump(db.session.scalars(stmt), many=True)}


@bp.post("")
def create_account():
    """Administrators create an account for someone, whatever REGISTRATION says; no one is signed in by it.

    The same rules as a registration apply (and give the same 400 and 409 answers); ``is_admin`` defaults to
    false. The new user signs in with ``POST /api/auth/login``.
    ---
    requestBody: {required: true, content: {application/json: {schema: UserCreateSchema}}}
    responses:
      201: {description: The account created., content: {application/json: {schema: UserUpdatedSchema}}}
      403: {$ref: "#/components/responses/Forbidden"}
      409: {$ref: "#/components/responses/Conflict"}
    """
    require_admin()
    data = load_json(UserCreateSchema())
    user = create_user(**data)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # the unique constraints decide, as at registration
        raise duplicate_user(data["username"], data["email"]) from None
    return {"message": "User created.", "user": user_schema.dump(user)}, 201


@bp.get("/me")
def get_me():
    """The signed-in user's profile.
    ---
    responses:
      200: {description: The profile., content: {application/json: {schema: UserResponseSchema}}}
    """
    return {"user": user_schema.dump(current_user)}


@bp.patch("/me")
def update_me():
    """Change one's own full name, phone (``null`` or "" clears it) or time zone (an IANA name such as Europe/London;
    ``null`` goes back to the firm's DEFAULT_TIME_ZONE).

    ``email`` is accepted as it is now (a form may send every field back), but a new address is a 400: it is changed
    with ``POST /api/auth/me/email``, which asks for the password and confirms the address by a link sent to it.
    ---
    requestBody: {required: true, content: {application/json: {schema: ProfileSchema}}}
    responses:
      200: {description: The profile as changed., content: {application/json: {schema: UserUpdatedSchema}}}
    """
    data = load_json(ProfileSchema())
    if not data:
        raise APIError("Nothing to update: send full_name, phone or time_zone.")
    if data.pop("email", current_user.email) != current_user.email:
        raise APIError(
            "To change your email address, use POST /api/auth/me/email with your current password: a link sent to "
            "the new address confirms it.",
            400,
            {"email": ["Changed only with POST /api/auth/me/email."]},
        )
    for field, value in data.items():
        setattr(current_user, field, value)
    db.session.commit()
    return {"message": "Profile updated.", "user": user_schema.dump(current_user)}


@bp.patch("/<uuid:user_id>")
def update_user(user_id: uuid.UUID):
    """Administrators activate or deactivate an account, or grant or remove admin; the last active
    administrator cannot be deactivated or demoted.

    A deactivated user's tokens stop working at once, and so do the links emailed to the account (password reset,
    email change, verification): reactivating it revives neither. Deactivating or demoting an administrator revokes
    the pending invitations they sent (the message says how many); granting admin again does not revive them.
    ---
    requestBody: {required: true, content: {application/json: {schema: UserAdminSchema}}}
    responses:
      200: {description: The account as changed., content: {application/json: {schema: UserUpdatedSchema}}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      409: {$ref: "#/components/responses/Conflict"}
    """
    require_admin()
    data = load_json(UserAdminSchema())
    if not data:
        raise APIError("Nothing to update: send is_active or is_admin.")
    # Lock every active administrator, in id order: of two administrators demoting each other at once,
    # the second waits, then sees the first change and is refused.
    admins = set(
        db.session.scalars(
            select(User.id).where(User.is_admin, User.is_active).order_by(User.id).with_for_update(key_share=True)
        )
    )
    if current_user.id not in admins:
        raise APIError("Only an administrator can do this.", 403)  # demoted while this request waited
    user = db.get_or_404(User, user_id, description="User not found.", with_for_update={"key_share": True})
    stays_admin = data.get("is_admin", user.is_admin) and data.get("is_active", user.is_active)
    if admins == {user.id} and not stays_admin:
        raise APIError(
            "This is the last active administrator: make someone else an administrator first.",
            409,
            {field: ["The last active administrator must stay an active administrator."] for field in data},
        )
    deactivated = user.is_active and data.get("is_active") is False
    stepped_down = user.id in admins and not stays_admin
    for field, value in data.items():
        setattr(user, field, value)
    now, message = utcnow(), "User updated."
    if deactivated:
        end_sessions(LoginSession.user_id == user.id)  # reactivation later must not revive old tokens
        # Nor old links: a reset link mailed before would otherwise work again once the account is reactivated.
        tokens.revoke(tokens.ACCOUNT_LINKS, now, user_id=user.id)
    if stepped_down:
        # An invitation is only as good as the administrator behind it (accept-invitation checks the inviter too).
        # A conditional UPDATE of the invitations, like the one that accepts one: of the two at once, one waits for
        # the other, so an invitation ends up accepted before the demotion or revoked by it.
        revoked = tokens.revoke("invitation", now, created_by_id=user.id)
        if revoked:
            message += f" The {revoked} pending invitation(s) they sent were revoked: their links no longer work."
    db.session.commit()
    return {"message": message, "user": user_schema.dump(user)}
