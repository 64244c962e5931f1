"""Links sent by email that work once (issue 15): password resets, invitations, address verifications and changes,
all in ``models.OneTimeToken``.

The raw token goes into the link and nowhere else; the table keeps its SHA-256 (hex), so a copy of the database opens
nothing. Tokens are 32 random bytes, so an unsalted fast hash is enough: there is nothing to guess a dictionary for.

Every function works in the caller's transaction and never commits, and takes ``now`` so that tests drive the clock.
"""

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from models import TOKEN_PURPOSES, OneTimeToken, User, db

# Longer than any token_urlsafe(32) (43 characters) by a margin; anything longer is not one of ours.
MAX_TOKEN_LENGTH = 128


def hash_token(raw: str) -> str:
    """The stored form of a raw token: its SHA-256, hex."""
    return hashlib.sha256(raw.encode()).hexdigest()


def issue(
    purpose: str,
    email: str,
    *,
    lifetime: timedelta,
    now: datetime,
    user_id: uuid.UUID | None = None,
    created_by_id: uuid.UUID | None = None,
    data: Any = None,
) -> tuple[OneTimeToken, str]:
    """A new token for ``purpose``, valid for ``lifetime`` from ``now``: the row (flushed) and the raw token, which
    exists only in this return value and the link built from it."""
    if purpose not in TOKEN_PURPOSES:
        raise ValueError(f"Unknown token purpose {purpose!r}")
    raw = secrets.token_urlsafe(32)
    row = OneTimeToken(
        purpose=purpose,
        token_hash=hash_token(raw),
        email=email,
        user_id=user_id,
        created_by_id=created_by_id,
        data=data,
        created_at=now,
        expires_at=now + lifetime,
    )
    db.session.add(row)
    db.session.flush()
    return row, raw


# The links sent to an account's owner: a new password or a confirmed address ends them all.
ACCOUNT_LINKS = ("password_reset", "email_change", "email_verification")


def _live(purpose: str | tuple[str, ...], now: datetime):
    """The conditions of a token still good for ``purpose`` (or any of several) at ``now``."""
    return (
        OneTimeToken.purpose == purpose if isinstance(purpose, str) else OneTimeToken.purpose.in_(purpose),
        OneTimeToken.used_at.is_(None),
        OneTimeToken.revoked_at.is_(None),
        OneTimeToken.expires_at > now,
    )


def _usable(raw) -> bool:
    return isinstance(raw, str) and 0 < len(raw) <= MAX_TOKEN_LENGTH


def consume(purpose: str, raw: str, now: datetime) -> OneTimeToken | None:
    """Use a token: its row, now marked used, or None if it is unknown, for another purpose, used, revoked or expired
    (the caller answers the same for all of these, so a guess learns nothing).

    One conditional UPDATE, so two requests presenting the same token at once cannot both succeed: PostgreSQL makes
    the second wait for the first's row lock and then finds ``used_at`` set; SQLite has one writer at a time. The
    token is looked up by its hash, an index key: no comparison ever runs between a secret and what was presented, so
    there is no timing to learn from (comparing raw tokens in the database would be; comparing hashes is not, since
    knowing a prefix of a hash tells nothing about the token that would make it)."""
    if not _usable(raw):
        return None
    statement = (
        update(OneTimeToken)
        .where(OneTimeToken.token_hash == hash_token(raw), *_live(purpose, now))
        .values(used_at=now)
        .returning(OneTimeToken)
        .execution_options(populate_existing=True)
    )
    return db.session.scalars(statement).first()


def consume_for_account(purpose: str, raw: str, now: datetime) -> tuple[OneTimeToken, User] | None:
    """Use a token that acts on an account, locking the account (FOR NO KEY UPDATE) before the token: the token and
    the account, or None (as ``consume``, and when the token names no account or the account is gone).

    The account first, then its links, is the order of every request that locks both (a resend, an email change, a
    deactivation): two requests taking them in opposite orders at once could each hold what the other waits for, and
    PostgreSQL would end one of them as a deadlock."""
    found = find(purpose, raw, now)
    if found is None or found.user_id is None:
        return None
    user = db.session.get(User, found.user_id, with_for_update={"key_share": True})
    token = consume(purpose, raw, now)
    if user is None or token is None:
        return None
    return token, user


def find(purpose: str, raw: str, now: datetime) -> OneTimeToken | None:
    """A token still good for ``purpose``, without using it (to show what a link is for before it is acted on), or
    None. Not a check before ``consume``: between the two another request may use it; ``consume`` decides."""
    if not _usable(raw):
        return None
    statement = select(OneTimeToken).where(OneTimeToken.token_hash == hash_token(raw), *_live(purpose, now))
    return db.session.scalars(statement).first()


def revoke(
    purpose: str | tuple[str, ...],
    now: datetime,
    *,
    user_id: uuid.UUID | None = None,
    email: str | None = None,
    created_by_id: uuid.UUID | None = None,
) -> int:
    """Revoke the outstanding tokens for ``purpose`` (or any of several, such as ACCOUNT_LINKS) of an account
    (``user_id``), an address (``email``, exactly as stored) or a sender (``created_by_id``): how many. Used and
    expired tokens are left as they are."""
    if user_id is None and email is None and created_by_id is None:
        raise ValueError("revoke needs a user_id, an email or a created_by_id")
    conditions = list(_live(purpose, now))
    if user_id is not None:
        conditions.append(OneTimeToken.user_id == user_id)
    if email is not None:
        conditions.append(OneTimeToken.email == email)
    if created_by_id is not None:
        conditions.append(OneTimeToken.created_by_id == created_by_id)
    statement = (
        update(OneTimeToken).where(*conditions).values(revoked_at=now).execution_options(synchronize_session=False)
    )
    return db.session.execute(statement).rowcount
