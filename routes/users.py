"""The people tasks can be assigned to."""

from flask import Blueprint
from sqlalchemy import func, select

from models import User, db
from routes import require_login
from schemas import UserSchema

bp = Blueprint("users", __name__, url_prefix="/api/users")
bp.before_request(require_login)


@bp.get("")
def list_users():
    """Active users, by name, for the assignment drop-down."""
    users = db.session.scalars(
        select(User).where(User.is_active).order_by(func.lower(User.full_name), User.full_name, User.username)
    )
    return {"users": UserSchema(many=True).dump(users)}
