"""Registration, login and the current user; the JWT identity wiring lives here too."""

import secrets
import uuid
from functools import cache

from flask import Blueprint, current_app, request
from flask_jwt_extended import JWTManager, create_access_token, current_user, jwt_required
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from models import User, db
from routes import load_json
from routes.errors import APIError
from schemas import LoginSchema, RegisterSchema, UserSchema

bp = Blueprint("auth", __name__, url_prefix="/api/auth")
jwt = JWTManager()
user_schema = UserSchema()


@bp.before_app_request
def accept_any_case_bearer() -> None:
    """HTTP auth schemes are case-insensitive (RFC 7235): "bearer <token>" works like "Bearer <token>"."""
    scheme, _, token = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and scheme != "Bearer":
        request.environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"


@jwt.user_identity_loader
def user_identity(user: User) -> str:
    return str(user.id)


@jwt.user_lookup_loader
def load_user(_header: dict, payload: dict) -> User | None:
    """Load the token's user on every request, so deleted and deactivated accounts lose access at once."""
    try:
        user_id = uuid.UUID(payload["sub"])
    except (KeyError, TypeError, ValueError):
        return None
    user = db.session.get(User, user_id)
    return user if user is not None and user.is_active else None


def create_user(username: str, email: str, password: str, full_name: str) -> User:
    """Add a user to the session; the caller commits and handles a duplicate with ``duplicate_user``."""
    user = User(username=username, email=email, full_name=full_name)
    user.set_password(password)
    db.session.add(user)
    return user


def duplicate_user(username: str, email: str) -> APIError:
    """The 409 for a username or email already taken (run after the failed insert was rolled back)."""
    taken = db.session.execute(
        select(User.username, User.email).where(or_(User.username == username, User.email == email))
    ).all()
    details = {}
    if any(row.username == username for row in taken):
        details["username"] = ["This username is already taken."]
    if any(row.email == email for row in taken):
        details["email"] = ["This email is already registered."]
    message = " ".join(messages[0] for messages in details.values()) or "This account already exists."
    return APIError(message, 409, details)


@cache
def stand_in_hash(method: str) -> str:
    """A hash of a random password, to check when the username is unknown."""
    return generate_password_hash(secrets.token_urlsafe(), method=method)


def authenticate(username: str, password: str) -> User | None:
    """The active user with these credentials. An unknown username costs the same hash check as a wrong
    password, so response times do not tell which usernames exist."""
    user = db.session.scalar(select(User).where(User.username == username))
    if user is None:
        check_password_hash(stand_in_hash(current_app.config["PASSWORD_HASH_METHOD"]), password)
        return None
    return user if user.check_password(password) and user.is_active else None


def session_response(message: str, user: User) -> dict:
    return {"message": message, "user": user_schema.dump(user), "access_token": create_access_token(user)}


@bp.post("/register")
def register():
    """Create an account and log it in."""
    data = load_json(RegisterSchema())
    user = create_user(**data)
    try:
        db.session.commit()
    except IntegrityError:
        # The unique constraints decide, so parallel registrations of one name give one 201 and 409s.
        db.session.rollback()
        raise duplicate_user(data["username"], data["email"]) from None
    return session_response("Registration successful.", user), 201


@bp.post("/login")
def login():
    """Exchange a username and password for an access token."""
    data = load_json(LoginSchema())
    user = authenticate(data["username"], data["password"])
    if user is None:
        raise APIError("Invalid username or password.", 401)
    return session_response("Login successful.", user)


@bp.get("/me")
@jwt_required()
def me():
    """The user the access token belongs to."""
    return {"user": user_schema.dump(current_user)}
