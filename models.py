"""Database models: users and the tasks they log, create and are assigned."""

import sqlite3
import uuid
from datetime import UTC, datetime

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import CheckConstraint, DateTime, ForeignKey, MetaData, String, Text, event, false
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry, relationship
from sqlalchemy.types import TypeDecorator
from werkzeug.security import check_password_hash, generate_password_hash

TASK_STATUSES = ("open", "closed")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware timestamp stored as UTC and always read back with its UTC offset.

    PostgreSQL's timestamptz converts by itself; SQLite keeps whatever it is given and
    returns it naive, so values are converted to UTC on the way in and tagged on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    registry = registry(
        # Named constraints keep migrations reviewable and identical on both databases.
        metadata=MetaData(
            naming_convention={
                "ix": "ix_%(column_0_label)s",
                "uq": "uq_%(table_name)s_%(column_0_name)s",
                "ck": "ck_%(table_name)s_%(constraint_name)s",
                "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
                "pk": "pk_%(table_name)s",
            }
        ),
        type_annotation_map={datetime: UTCDateTime},
    )


# A view commits once, at its end, then serialises what it wrote: no need to reload it all from the database.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})


def simple_lower(text):
    """Lower case one character at a time, as PostgreSQL's lower() does: no final-sigma rule, and "İ" gives "i"."""
    if not isinstance(text, str):
        return text
    return "".join(character.lower()[0] for character in text)


@event.listens_for(Engine, "connect")
def _configure_sqlite(dbapi_connection, _connection_record):
    """Make SQLite behave like PostgreSQL where the API depends on it."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN comes too late; see _begin_sqlite
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        # SQLite's own lower() folds ASCII only; case-insensitive filters must match "MÜLLER" too.
        dbapi_connection.create_function("lower", 1, simple_lower, deterministic=True)


@event.listens_for(Engine, "begin")
def _begin_sqlite(connection):
    """Take SQLite's write lock when a transaction begins, as SQLAlchemy's pysqlite notes suggest: writers
    then queue like PostgreSQL's row locks make them, and every timestamp is taken after the lock."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class User(db.Model):
    __tablename__ = "app_users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    full_name: Mapped[str] = mapped_column(String(120))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    phone: Mapped[str | None] = mapped_column(String(32))

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password, method=current_app.config["PASSWORD_HASH_METHOD"])

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def password_needs_rehash(self) -> bool:
        """Was the stored hash made with other parameters than the configured method (weaker ones, say)?"""
        return self.password_hash.partition("$")[0] != current_app.config["PASSWORD_HASH_METHOD"]

    def __repr__(self) -> str:
        return f"<User {self.username}>"


class Task(db.Model):
    __tablename__ = "tasks"
    __table_args__ = (CheckConstraint("status IN ('open', 'closed')", name="status"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    date_created: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    entity_name: Mapped[str] = mapped_column(String(255), index=True)
    task_type: Mapped[str] = mapped_column(String(50), index=True)
    task_time: Mapped[datetime] = mapped_column(index=True)
    contact_person_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("app_users.id", ondelete="SET NULL"), index=True
    )
    note: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(10), default="open", index=True)
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="SET NULL"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)

    # A task is always shown with its people: load them in the same statement, never one by one.
    contact_person: Mapped[User | None] = relationship(foreign_keys=[contact_person_id], lazy="joined")
    created_by: Mapped[User | None] = relationship(foreign_keys=[created_by_id], lazy="joined")

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.entity_name!r} {self.status}>"


class LoginSession(db.Model):
    """One login and the tokens refreshed from it (a token family): its refresh token rotates at every refresh."""

    __tablename__ = "login_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("app_users.id", ondelete="CASCADE"), index=True)
    refresh_jti: Mapped[str] = mapped_column(String(36))  # the one refresh token of this login still usable
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)  # its refresh token's expiry: purged after it

    def __repr__(self) -> str:
        return f"<LoginSession {self.id} of {self.user_id}>"


class RevokedToken(db.Model):
    """The blocklist: a token's ``jti``, or a login session's id to revoke every token of that session.
    Rows are useless once ``expires_at`` (the tokens' own expiry) has passed; ``flask purge-tokens`` removes them."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(36), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<RevokedToken {self.jti}>"
