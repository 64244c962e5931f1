"""The transactional outbox (issue 15): what must go out is queued in the transaction of the change that caused it,
then claimed, sent and marked by whoever delivers it (a Celery worker, or the app itself with no broker).

Every function works in the caller's transaction and never commits: a claim must commit before the sending starts
(so that another sender sees it), and the mark after the sending ends. Each takes ``now``, so that tests drive the
clock. Models: ``models.OutboxMessage``."""

import random
import uuid
from datetime import datetime, timedelta

from flask import current_app, has_app_context
from sqlalchemy import Connection, or_, select, true, tuple_, update

from models import OutboxMessage, db, insert

# How long a claim holds a message: a sender that dies mid-send (killed, its machine gone) frees it after this, and
# the sweep hands it to another. Longer than any send takes (the SMTP timeout is 10 s per reply).
LEASE = timedelta(minutes=2)
# Failed attempts wait a random time up to BACKOFF_BASE x 2^(attempts - 1), at most BACKOFF_CAP ("full jitter": many
# messages failing together, say while the mail server was down, do not all come back at once).
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_CAP = timedelta(hours=1)
# After this many attempts a message is parked as failed, for an administrator to see and retry.
MAX_ATTEMPTS = 8
DUE = ("pending", "sending")
# A message handed to the broker is handed over again only after this long without a claim: short enough that one the
# broker lost (Redis restarted without its data) goes out soon after, long enough that the sweep queues no second copy
# of a backlog the workers drain within it (some 140,000 messages at bench/outbox.md's 157 a second; a longer one
# gets its second copies, which cost the workers a claim that fails, and no email).
HAND_OVER_AGAIN_AFTER = timedelta(minutes=15)
QUEUED = "outbox_queued"  # session.info: ids of the messages this transaction queued, handed to senders at commit


def add(kind: str, recipient: str, event_key: str, payload: dict, now: datetime) -> uuid.UUID | None:
    """Queue a message in the caller's transaction: its id. ``event_key`` names the event that caused it: the same
    event for the same recipient is queued once, however often it is added (None then). Only the id comes back: the
    request that queues it needs nothing more, and pays for nothing more.

    When the commit will publish it to the broker, it is noted as handed over now, in this same INSERT, before it is
    published: the sweep then leaves it to the workers, at no cost to the request, and the publisher clears the note
    if the broker does not take it (jobs.CeleryRunner)."""
    row = {"kind": kind, "recipient": recipient, "event_key": event_key, "payload": payload}
    if published_at_commit():
        row["handed_over_at"] = now
    statement = (
        insert(OutboxMessage)
        .values(**row, state="pending", attempts=0, next_attempt_at=now, created_at=now)
        .on_conflict_do_nothing(index_elements=["event_key", "recipient"])
        .returning(OutboxMessage.id)
    )
    message_id = db.session.scalar(statement)
    if message_id is not None:
        db.session.info.setdefault(QUEUED, []).append(message_id)  # jobs.hand_over_after_commit
    return message_id


def published_at_commit() -> bool:
    """Whether the commit publishes its messages to the broker: the app's runner does (jobs.CeleryRunner), and
    JOBS_AFTER_COMMIT is not off."""
    runner = current_app.extensions.get("jobs") if has_app_context() else None
    return getattr(runner, "publishes", False) and current_app.config.get("JOBS_AFTER_COMMIT", True)


def claim(message_id, now: datetime) -> OutboxMessage | None:
    """Take a due message for sending, for LEASE: the message, or None if it is not due (sent, failed, waiting for
    its next attempt, or claimed by another sender). One conditional UPDATE: of two senders claiming it at once,
    PostgreSQL makes the second wait for the first and then finds it no longer due; SQLite has one writer at a time.
    The attempt is counted here, before sending, so a message that kills its sender every time is claimed at most
    MAX_ATTEMPTS times, then parked by ``park_abandoned``. The hand-over that brought the message here is spent: once
    due again (after a failure's backoff, or this lease), the sweep hands it over again."""
    statement = (
        update(OutboxMessage)
        .where(
            OutboxMessage.id == message_id,
            OutboxMessage.state.in_(DUE),
            OutboxMessage.next_attempt_at <= now,
            OutboxMessage.attempts < MAX_ATTEMPTS,
        )
        .values(state="sending", attempts=OutboxMessage.attempts + 1, next_attempt_at=now + LEASE, handed_over_at=None)
        .returning(OutboxMessage)
        .execution_options(populate_existing=True)
    )
    return db.session.scalars(statement).first()


def mark_sent(message: OutboxMessage, now: datetime) -> OutboxMessage:
    """It went out: sent, whoever holds the message now (if this sender's lease ran out and another claimed it, that
    one's later failure must not make it go out a third time). Its payload goes: it may hold a single-use link, which
    the database keeps only as a hash (tokens.py)."""
    return finish(message, OutboxMessage.state != "sent", state="sent", sent_at=now, last_error=None, payload={})


def mark_failed(
    message: OutboxMessage, error: str, now: datetime, permanent: bool = False, rng: random.Random = random
) -> OutboxMessage:
    """A failed attempt: tried again after its backoff, or parked as failed (a permanent error, such as an address the
    server refuses, or the last attempt). Only while this sender's claim holds: after its lease ran out, the message
    is another sender's to mark (its lease's end tells the claims apart, even after an administrator's retry)."""
    error = error[:2000]
    if permanent or message.attempts >= MAX_ATTEMPTS:
        values = {"state": "failed", "last_error": error}
    else:
        values = {"state": "pending", "last_error": error, "next_attempt_at": now + backoff(message.attempts, rng)}
    return finish(
        message, OutboxMessage.state == "sending", OutboxMessage.next_attempt_at == message.next_attempt_at, **values
    )


def finish(message: OutboxMessage, *conditions, **values) -> OutboxMessage:
    """Set ``values`` on the message where ``conditions`` hold, in one UPDATE: the message as it is now (``message``
    itself, reloaded, unless it was kept out of the session)."""
    statement = (
        update(OutboxMessage)
        .where(OutboxMessage.id == message.id, *conditions)
        .values(**values)
        .returning(OutboxMessage)
        .execution_options(populate_existing=True)
    )
    finished = db.session.scalars(statement).first()
    return finished if finished is not None else db.session.get(OutboxMessage, message.id, populate_existing=True)


def backoff(attempts: int, rng: random.Random = random) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: random, up to BACKOFF_BASE x 2^(attempts - 1), capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))
    return ceiling * rng.random()


def park_abandoned(now: datetime) -> int:
    """Park as failed the messages whose every attempt ended with its sender gone (killed, out of memory: something in
    the message kills it, perhaps): how many. Run by the sweep."""
    statement = (
        update(OutboxMessage)
        .where(
            OutboxMessage.state == "sending",
            OutboxMessage.next_attempt_at <= now,
            OutboxMessage.attempts >= MAX_ATTEMPTS,
        )
        .values(state="failed", last_error=f"Its sender stopped during each of its {MAX_ATTEMPTS} attempts.")
        .execution_options(synchronize_session=False)
    )
    return db.session.execute(statement).rowcount


def due(now: datetime, limit: int = 100, after=None) -> list:
    """The messages due now that no sender holds, as (id, next_attempt_at) rows in that order, after ``after`` if
    given (the last row of the batch before, to page through them): due, and not handed over since their last claim
    (new, a retry after its backoff, a sender's lease run out), or handed over so long ago that the hand-over was
    lost. On PostgreSQL rows another sweep has locked are skipped (two sweeps at once split the work); handing a
    message out twice is harmless anyway, as only one claim of it succeeds."""
    position = tuple_(OutboxMessage.next_attempt_at, OutboxMessage.id)
    next_batch = true() if after is None else position > tuple_(after.next_attempt_at, after.id)
    query = (
        select(OutboxMessage.id, OutboxMessage.next_attempt_at)
        .where(
            OutboxMessage.state.in_(DUE),
            OutboxMessage.next_attempt_at <= now,
            or_(
                OutboxMessage.handed_over_at.is_(None),
                OutboxMessage.handed_over_at <= now - HAND_OVER_AGAIN_AFTER,
            ),
            next_batch,
        )
        .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(db.session.execute(query))


def handed_over(message_ids: list, now: datetime | None) -> None:
    """Note that these messages are handed to senders at ``now``, before they are (so that no claim can come first):
    ``due`` leaves them out until a claim makes them due again, or HAND_OVER_AGAIN_AFTER has passed. ``now`` None:
    they could not be handed over after all."""
    if message_ids:
        statement = (
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(message_ids))
            .values(handed_over_at=now)
            .execution_options(synchronize_session=False)
        )
        db.session.execute(statement)


def retry(message_id, now: datetime) -> OutboxMessage | None:
    """An administrator sends a failed message again: as new, due now. None unless it had failed."""
    statement = (
        update(OutboxMessage)
        .where(OutboxMessage.id == message_id, OutboxMessage.state == "failed")
        .values(state="pending", attempts=0, next_attempt_at=now)
        .returning(OutboxMessage)
        .execution_options(populate_existing=True)
    )
    return db.session.scalars(statement).first()


# How far back the delivery times in ``figures`` look: messages sent in the last LATENCY_WINDOW, at most the
# LATENCY_SAMPLE sent last (however long each had waited: a backlog's slow messages count most).
LATENCY_WINDOW = timedelta(minutes=5)
LATENCY_SAMPLE = 10_000
# The outbox's states as /metrics reports them: "retrying" is pending after a failed attempt.
REPORTED_STATES = ("pending", "sending", "failed", "retrying")


def figures(now: datetime, connection: Connection) -> dict:
    """What /metrics reports about the outbox, read from the table (so it covers every worker on every machine):
    messages by state (REPORTED_STATES), the age of the oldest one still to send, and
    the seconds from queueing to sending of those sent lately (sorted). On a connection of its own, not the session."""
    unsent = (*DUE, "failed")
    by_state = select(OutboxMessage.state, db.func.count()).where(OutboxMessage.state.in_(unsent))
    counts = dict.fromkeys(REPORTED_STATES, 0) | dict(connection.execute(by_state.group_by(OutboxMessage.state)).all())
    counts["retrying"] = connection.scalar(
        select(db.func.count()).where(OutboxMessage.state == "pending", OutboxMessage.attempts > 0)
    )
    oldest = connection.scalar(select(db.func.min(OutboxMessage.created_at)).where(OutboxMessage.state.in_(DUE)))
    recent = (
        select(OutboxMessage.created_at, OutboxMessage.sent_at)
        .where(OutboxMessage.sent_at >= now - LATENCY_WINDOW)
        .order_by(OutboxMessage.sent_at.desc())
        .limit(LATENCY_SAMPLE)
    )
    delays = sorted((sent - created).total_seconds() for created, sent in connection.execute(recent))
    return {
        "messages": counts,
        "oldest_unsent_age": (now - oldest).total_seconds() if oldest is not None else 0.0,
        "delivery_seconds": delays,
    }
