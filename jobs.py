"""Background work (issue 15): sending what the outbox holds. ``send_message`` sends one message, once, whoever calls it
and however often; ``sweep`` hands every due message to a sender (messages whose first sending was lost, and retries
whose backoff has passed). Celery's tasks and the embedded runner, which come next, only call these two."""

from collections.abc import Callable

from flask import current_app

import mail
import outbox
from models import db, utcnow


def send_message(message_id) -> str | None:
    """Claim the message, send it, and mark it sent or failed: its state afterwards, or None if it was not due (sent,
    failed, waiting for its next attempt, or being sent by another sender). The claim commits before the sending
    starts, so that no one else sends it meanwhile, and the mark commits after it ends."""
    message = outbox.claim(message_id, utcnow())
    db.session.commit()
    if message is None:
        return None
    log = {"extra": {"outbox_id": str(message.id), "kind": message.kind}}
    try:
        if current_app.config["MAIL_BACKEND"] == "disabled":
            current_app.logger.info(
                "Email disabled (MAIL_BACKEND=disabled): outbox message %s dropped", message.id, **log
            )
        else:
            mail.deliver(mail.compose(message.kind, message.recipient, message.payload, str(message.id)))
    except mail.PermanentMailError as error:
        db.session.rollback()
        outbox.mark_failed(message, str(error), utcnow(), permanent=True)
        current_app.logger.error("Outbox message %s refused for good: %s", message.id, error, **log)
    except Exception as error:  # a transient failure, or a bug: tried again after the backoff, then parked
        db.session.rollback()  # whatever failed may have left the transaction unusable (PostgreSQL)
        outbox.mark_failed(message, f"{type(error).__name__}: {error}", utcnow())
        current_app.logger.warning(
            "Outbox message %s not sent (attempt %d): %s", message.id, message.attempts, error, **log
        )
    else:
        outbox.mark_sent(message, utcnow())
        current_app.logger.info("Outbox message %s sent", message.id, **log)
    db.session.commit()
    return message.state


def sweep(send: Callable[[object], object] = send_message, limit: int = 100) -> int:
    """Park the messages whose senders kept dying, then hand each message due now to ``send`` (``send_message``
    itself, or a function queuing it for a worker): how many were handed. Two sweeps at once, or a message also
    queued by its commit, are harmless: only one claim of it succeeds. One failing hand-over stops no other."""
    outbox.park_abandoned(utcnow())
    due = outbox.due(utcnow(), limit)
    db.session.commit()  # releases the rows the selection locked
    for message_id in due:
        try:
            send(message_id)
        except Exception:
            db.session.rollback()
            current_app.logger.exception("Outbox message %s could not be handed over", message_id)
    return len(due)
