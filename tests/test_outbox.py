"""The transactional outbox's rules (outbox.py): queued once per event and recipient, claimed by one sender at a
time for a lease, retried after a random backoff, parked as failed, swept when due. The clock is passed in."""

import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

import outbox
from helpers import POSTGRES_URL, assert_error
from models import OutboxMessage, db

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def due_ids(now: datetime, **options) -> list:
    return [row.id for row in outbox.due(now, **options)]


def queue(event_key: str = "password-reset:1", recipient: str = "alice@example.com", now: datetime = NOW):
    message_id = outbox.add("password_reset", recipient, event_key, {"link": "https://tasks.example/reset"}, now)
    return message_id and db.session.get(OutboxMessage, message_id)


def test_an_event_queues_one_message_per_recipient(app):
    with app.app_context():
        first = queue()
        assert first is not None and first.state == "pending" and first.next_attempt_at == NOW
        assert queue() is None  # the same event for the same person: already queued
        assert queue(recipient="bob@example.com") is not None
        assert queue(event_key="password-reset:2") is not None
        db.session.commit()
        assert db.session.scalar(select(func.count()).select_from(OutboxMessage)) == 3


def test_a_message_is_claimed_once_until_its_lease_ends(app):
    with app.app_context():
        message_id = queue().id
        db.session.commit()

        claimed = outbox.claim(message_id, NOW)
        assert claimed.state == "sending" and claimed.attempts == 1
        assert claimed.next_attempt_at == NOW + outbox.LEASE
        assert outbox.claim(message_id, NOW) is None  # another delivery of the same message
        assert outbox.claim(message_id, NOW + outbox.LEASE - timedelta(seconds=1)) is None

        again = outbox.claim(message_id, NOW + outbox.LEASE)  # its sender died mid-send: the lease ended
        assert again.attempts == 2 and again.next_attempt_at == NOW + 2 * outbox.LEASE


def test_a_message_waiting_for_its_next_attempt_is_not_claimed(app):
    with app.app_context():
        message_id = queue(now=NOW + timedelta(minutes=5)).id
        assert outbox.claim(message_id, NOW) is None
        assert outbox.claim(message_id, NOW + timedelta(minutes=5)) is not None


def test_sent_messages_are_never_claimed_again(app):
    with app.app_context():
        message = outbox.claim(queue().id, NOW)
        outbox.mark_sent(message, NOW + timedelta(seconds=1))
        db.session.commit()

        assert (message.state, message.sent_at, message.last_error) == ("sent", NOW + timedelta(seconds=1), None)
        assert outbox.claim(message.id, NOW + timedelta(days=1)) is None
        assert due_ids(NOW + timedelta(days=1)) == []


def test_a_failure_waits_a_random_backoff_that_doubles_up_to_its_cap(app):
    class Highest(random.Random):
        def random(self) -> float:
            return 1.0  # the longest wait allowed, so the ceilings show

    waits = [outbox.backoff(attempts, Highest()) for attempts in range(1, 10)]
    assert waits[:4] == [timedelta(seconds=30), timedelta(seconds=60), timedelta(seconds=120), timedelta(seconds=240)]
    assert max(waits) == outbox.BACKOFF_CAP and waits[-1] == outbox.BACKOFF_CAP
    generator = random.Random(7)
    assert all(timedelta(0) <= outbox.backoff(3, generator) <= timedelta(seconds=120) for _ in range(200))

    with app.app_context():
        message = outbox.claim(queue().id, NOW)
        outbox.mark_failed(message, "451 try again later", NOW, rng=Highest())
        assert (message.state, message.last_error) == ("pending", "451 try again later")
        assert message.next_attempt_at == NOW + timedelta(seconds=30)
        assert outbox.claim(message.id, NOW + timedelta(seconds=29)) is None
        assert outbox.claim(message.id, NOW + timedelta(seconds=30)).attempts == 2


def test_a_message_is_parked_as_failed_after_its_last_attempt_or_a_permanent_error(app):
    with app.app_context():
        refused = outbox.claim(queue().id, NOW)
        outbox.mark_failed(refused, "550 no such mailbox", NOW, permanent=True)
        assert refused.state == "failed" and refused.last_error == "550 no such mailbox"

        message_id = queue(event_key="invitation:1").id
        now = NOW
        for attempt in range(1, outbox.MAX_ATTEMPTS + 1):
            message = outbox.claim(message_id, now)
            assert message.attempts == attempt
            outbox.mark_failed(message, "x" * 5000, now)
            now = message.next_attempt_at if message.state == "pending" else now
        assert message.state == "failed" and len(message.last_error) == 2000
        assert outbox.claim(message_id, now + timedelta(days=1)) is None
        db.session.commit()


def test_an_administrator_retries_a_failed_message_as_new(app):
    with app.app_context():
        message = outbox.claim(queue().id, NOW)
        assert outbox.retry(message.id, NOW) is None  # only failed messages
        outbox.mark_failed(message, "550 no such mailbox", NOW, permanent=True)
        later = NOW + timedelta(hours=3)

        retried = outbox.retry(message.id, later)

        assert (retried.state, retried.attempts, retried.next_attempt_at) == ("pending", 0, later)
        assert outbox.claim(message.id, later).attempts == 1


def test_the_sweep_finds_due_messages_oldest_first(app):
    with app.app_context():
        early = queue(event_key="a", now=NOW - timedelta(minutes=3)).id
        due_now = queue(event_key="b").id
        queue(event_key="c", now=NOW + timedelta(minutes=1))  # not yet
        stuck = queue(event_key="d", now=NOW - timedelta(hours=1)).id
        outbox.claim(stuck, NOW - timedelta(hours=1))  # claimed an hour ago by a sender that died: lease over
        sent = outbox.claim(queue(event_key="e", now=NOW - timedelta(days=1)).id, NOW - timedelta(days=1))
        outbox.mark_sent(sent, NOW - timedelta(days=1))
        db.session.commit()

        assert due_ids(NOW) == [stuck, early, due_now]
        first_two = outbox.due(NOW, limit=2)
        assert [row.id for row in first_two] == [stuck, early]
        assert due_ids(NOW, after=first_two[-1]) == [due_now]  # the next batch


def test_a_message_handed_over_is_due_again_only_when_its_sender_could_not_have_it(app):
    with app.app_context():
        keys = ("waiting", "retried", "abandoned", "lost")
        waiting, retried, abandoned, lost = (queue(event_key=key).id for key in keys)
        outbox.handed_over([waiting, retried, abandoned, lost], NOW)
        db.session.commit()
        assert due_ids(NOW) == []  # each with a sender (a worker, or queued for one)

        message = outbox.claim(retried, NOW + timedelta(seconds=1))
        outbox.mark_failed(message, "451 try again later", NOW + timedelta(seconds=2), rng=random.Random(1))
        outbox.claim(abandoned, NOW + timedelta(seconds=1))  # and its sender dies
        db.session.commit()
        after_backoff = message.next_attempt_at
        assert due_ids(after_backoff) == [retried]  # due again, and no sender has it since the claim
        assert due_ids(NOW + timedelta(seconds=1) + outbox.LEASE) == [retried, abandoned]  # its lease is over

        lost_or_waiting = NOW + outbox.HAND_OVER_AGAIN_AFTER
        assert set(due_ids(lost_or_waiting)) == {waiting, retried, abandoned, lost}  # the hand-over was lost: again
        outbox.handed_over([lost], None)  # it could not be handed over after all
        assert due_ids(NOW) == [lost]


@pytest.mark.own_database  # two connections, with real commits
def test_of_two_senders_claiming_one_message_at_once_one_gets_it(app):
    with app.app_context():
        message_id = queue().id
        db.session.commit()
    results = {}

    def second_sender() -> None:
        with app.app_context():
            results["second"] = outbox.claim(message_id, NOW)
            db.session.commit()

    with app.app_context():
        results["first"] = outbox.claim(message_id, NOW)  # holds the row (PostgreSQL) or the write lock (SQLite)
        other = threading.Thread(target=second_sender)
        other.start()
        if POSTGRES_URL:
            wait_for_a_lock_wait()  # the second claim is queued behind the first, not merely later
        db.session.commit()
    other.join(10)

    assert results["first"] is not None and results["second"] is None
    with app.app_context():
        assert db.session.get(OutboxMessage, message_id).attempts == 1


def wait_for_a_lock_wait(timeout: float = 10) -> None:
    """Until another connection of this database waits for a lock (polled: nothing to be told by)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db.session.execute(text("SELECT pg_stat_clear_snapshot()"))  # the view is read once per transaction
        waiting = db.session.connection().execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        )
        if waiting.scalar():
            return
        time.sleep(0.01)
    pytest.fail("the second claim never waited for the first")


@pytest.mark.own_database  # two senders, each with a session of its own
def test_a_sender_whose_lease_ran_out_cannot_undo_the_next_senders_work(app):
    late = NOW + outbox.LEASE

    def queued(event_key: str) -> str:
        with app.app_context():
            message_id = queue(event_key=event_key).id
            db.session.commit()
            return message_id

    def second_sender(message_id: str, finish) -> None:
        with app.app_context():
            finish(outbox.claim(message_id, late))
            db.session.commit()

    def final(message_id: str) -> OutboxMessage:
        with app.app_context():
            return db.session.get(OutboxMessage, message_id)

    sent_by_the_second = queued("password-reset:1")
    with app.app_context():  # the first sender: slow, its lease over before it marks
        slow = outbox.claim(sent_by_the_second, NOW)
        db.session.commit()
        second_sender(sent_by_the_second, lambda message: outbox.mark_sent(message, late))
        outbox.mark_failed(slow, "timed out", late + timedelta(seconds=1))  # too late: the second sent it
        db.session.commit()
    assert (final(sent_by_the_second).state, final(sent_by_the_second).attempts) == ("sent", 2)

    sent_by_the_first = queued("invitation:1")
    with app.app_context():
        slow = outbox.claim(sent_by_the_first, NOW)
        db.session.commit()
        second_sender(sent_by_the_first, lambda message: outbox.mark_failed(message, "451", late, rng=random.Random(1)))
        outbox.mark_sent(slow, late)  # the first sender's message did go out after all: sent, never again
        db.session.commit()
        assert outbox.claim(sent_by_the_first, late + outbox.BACKOFF_CAP) is None
    assert final(sent_by_the_first).state == "sent"


def test_a_message_that_kills_its_sender_every_time_is_parked_after_its_last_attempt(app):
    with app.app_context():
        message_id = queue().id
        now = NOW
        for _ in range(outbox.MAX_ATTEMPTS):  # each sender dies mid-send: its lease runs out
            assert outbox.claim(message_id, now) is not None
            now += outbox.LEASE
        assert outbox.claim(message_id, now) is None  # no ninth attempt
        assert outbox.park_abandoned(now - timedelta(seconds=1)) == 0  # the last sender's lease still runs

        assert outbox.park_abandoned(now) == 1
        db.session.commit()
        parked = db.session.get(OutboxMessage, message_id)
        db.session.refresh(parked)
        assert parked.state == "failed" and "stopped during each of its 8 attempts" in parked.last_error
        assert due_ids(now + timedelta(days=1)) == []


def test_a_late_failure_does_not_undo_a_claim_made_after_an_administrators_retry(app):
    """Attempts start again at 0 after a retry, so they cannot tell claims apart; the lease's end can."""
    with app.app_context():
        message_id = queue().id
        first = outbox.claim(message_id, NOW)  # the first sender, whose lease runs out while it waits
        db.session.commit()
        with app.app_context():  # meanwhile, in other senders' sessions
            second = outbox.claim(message_id, NOW + outbox.LEASE)
            outbox.mark_failed(second, "550 no such mailbox", NOW + outbox.LEASE, permanent=True)
            outbox.retry(message_id, NOW + outbox.LEASE)
            third = outbox.claim(message_id, NOW + outbox.LEASE + timedelta(seconds=1))
            assert third.attempts == first.attempts == 1
            db.session.commit()

        outbox.mark_failed(first, "timed out", NOW + outbox.LEASE + timedelta(seconds=2))  # the first, late
        db.session.commit()

        assert (first.state, first.last_error) == ("sending", "550 no such mailbox")  # the third's claim stands


def park(app, event_key: str, error: str = "550 no such mailbox", at: datetime = NOW) -> str:
    with app.app_context():
        message = outbox.claim(queue(event_key=event_key, now=at).id, at)
        outbox.mark_failed(message, error, at, permanent=True)
        db.session.commit()
        return str(message.id)


def test_administrators_list_the_outbox_newest_first_and_by_state(app, client, admin_headers):
    failed = park(app, "password-reset:1")
    with app.app_context():
        pending = str(queue(event_key="password-reset:2", now=NOW + timedelta(minutes=1)).id)
        db.session.commit()

    everything = client.get("/api/admin/outbox", headers=admin_headers)
    only_failed = client.get("/api/admin/outbox?state=failed", headers=admin_headers)

    assert everything.status_code == 200 and only_failed.status_code == 200
    assert [message["id"] for message in everything.get_json()["messages"]] == [pending, failed]
    [message] = only_failed.get_json()["messages"]
    assert message["id"] == failed and message["last_error"] == "550 no such mailbox"
    assert set(message) == {
        "id", "kind", "recipient", "event_key", "state", "attempts", "next_attempt_at", "last_error", "created_at",
        "sent_at",
    }  # fmt: skip  # never the payload: it may hold a password-reset link
    assert everything.headers["Cache-Control"] == "no-store"
    assert len(client.get("/api/admin/outbox?limit=1", headers=admin_headers).get_json()["messages"]) == 1


@pytest.mark.parametrize("query", ["state=lost", "limit=0", "limit=201", "limit=ten"])
def test_a_bad_outbox_query_is_a_400(client, admin_headers, query):
    assert_error(client.get(f"/api/admin/outbox?{query}", headers=admin_headers), 400)


def test_the_outbox_is_for_administrators_only(app, client, auth_headers):
    failed = park(app, "password-reset:1")
    assert_error(client.get("/api/admin/outbox"), 401)
    assert_error(client.get("/api/admin/outbox", headers=auth_headers), 403)
    assert_error(client.post(f"/api/admin/outbox/{failed}/retry", headers=auth_headers), 403)
    with app.app_context():
        assert db.session.get(OutboxMessage, uuid.UUID(failed)).state == "failed"


def test_an_administrator_sends_a_failed_message_again(app, client, admin_headers):
    failed = park(app, "password-reset:1")

    response = client.post(f"/api/admin/outbox/{failed}/retry", headers=admin_headers)

    assert response.status_code == 200, response.get_json()
    message = response.get_json()["message"]
    assert (message["id"], message["state"], message["attempts"]) == (failed, "pending", 0)
    with app.app_context():
        assert due_ids(datetime.now(UTC)) == [uuid.UUID(failed)]
    assert_error(client.post(f"/api/admin/outbox/{failed}/retry", headers=admin_headers), 409)  # pending now
    assert_error(client.post(f"/api/admin/outbox/{uuid.uuid4()}/retry", headers=admin_headers), 404)


def test_a_cors_preflight_of_the_outbox_needs_no_token(client):
    preflight = {"Origin": "http://localhost:4200", "Access-Control-Request-Method": "GET"}
    assert client.options("/api/admin/outbox", headers=preflight).status_code == 200
