"""Sending what the outbox holds (jobs.py) to a real SMTP server: each message once, however often its sending is
attempted; kept and sent later while the server is down; parked when it refuses for good; swept when a sender died.
The clock is jobs.utcnow, moved by the tests."""

from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

import pytest
from smtp_server import SmtpServer

import jobs
import outbox
from helpers import free_port
from models import OutboxMessage, db

START = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
RESET = {"full_name": "Alice Adams", "link": "https://tasks.example.com/reset?token=t", "expires_in": "1 hour"}


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock(START)
    monkeypatch.setattr(jobs, "utcnow", clock)
    return clock


@pytest.fixture
def server(app):
    with SmtpServer() as server:
        app.config.update(
            MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=server.port, MAIL_SECURITY="none",
            MAIL_MESSAGE_ID_DOMAIN="finstack.example",
        )  # fmt: skip
        yield server


def queue(app, event_key: str = "password-reset:1", at: datetime = START) -> str:
    with app.app_context():
        message_id = outbox.add("password_reset", "alice@example.com", event_key, RESET, at)
        db.session.commit()
        return message_id


def state(app, message_id) -> OutboxMessage:
    with app.app_context():
        return db.session.get(OutboxMessage, message_id)


def send(app, message_id):
    with app.app_context():
        return jobs.send_message(message_id)


def test_a_message_goes_out_once_however_often_it_is_sent(app, server, clock):
    message_id = queue(app)

    assert send(app, message_id) == "sent"
    assert send(app, message_id) is None  # the same message delivered to a worker twice
    clock.now += timedelta(days=1)
    assert send(app, message_id) is None

    [received] = server.received
    assert received.rcpt_tos == ["alice@example.com"]
    assert received.message["Message-ID"] == f"<{message_id}@finstack.example>"
    assert "https://tasks.example.com/reset?token=t" in received.message.get_body(("plain",)).get_content()
    assert (state(app, message_id).state, state(app, message_id).sent_at) == ("sent", START)


def test_while_the_server_is_down_a_message_waits_and_goes_out_once_it_is_back(app, clock, monkeypatch):
    monkeypatch.setattr(outbox, "backoff", lambda attempts, rng=None: timedelta(seconds=30 * attempts))
    port = free_port()  # nothing listens there yet
    app.config.update(MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=port, MAIL_SECURITY="none")
    message_id = queue(app)

    assert send(app, message_id) == "pending"
    waiting = state(app, message_id)
    assert waiting.attempts == 1 and "TransientMailError" in waiting.last_error
    assert waiting.next_attempt_at == START + timedelta(seconds=30)
    clock.now += timedelta(seconds=29)
    with app.app_context():
        assert jobs.sweep() == 0  # not due before its backoff has passed

    with SmtpServer() as server:
        app.config["MAIL_PORT"] = server.port
        clock.now = waiting.next_attempt_at
        with app.app_context():
            assert jobs.sweep() == 1
            assert jobs.sweep() == 0
        assert len(server.received) == 1
    assert state(app, message_id).state == "sent" and state(app, message_id).attempts == 2


@pytest.mark.parametrize(
    ("reply", "final"), [("550 5.1.1 No such user", "failed"), ("451 4.3.0 Try again later", "pending")]
)
def test_a_refusal_for_good_parks_the_message_and_one_for_now_retries_it(app, server, clock, reply, final):
    server.rcpt_reply = reply
    message_id = queue(app)

    assert send(app, message_id) == final
    assert reply.split()[0] in state(app, message_id).last_error
    assert server.received == []


def test_a_message_whose_sender_died_mid_send_is_swept_after_its_lease(app, server, clock):
    message_id = queue(app)
    with app.app_context():
        outbox.claim(message_id, START)  # a sender claimed it, then was killed before sending
        db.session.commit()
        assert jobs.sweep() == 0

        clock.now = START + outbox.LEASE
        assert jobs.sweep() == 1
    assert len(server.received) == 1 and state(app, message_id).attempts == 2


def test_a_sender_whose_lease_ran_out_leaves_the_next_senders_claim_alone(app, server, clock):
    message_id = queue(app)

    def second_sender_claims() -> None:  # the first is so slow that its lease runs out, and another claims the message
        clock.now = START + outbox.LEASE
        with app.app_context():
            outbox.claim(message_id, clock.now)
            db.session.commit()

    server.during_data, server.data_reply = second_sender_claims, "451 4.3.0 Try again later"

    assert send(app, message_id) == "sending"  # the first's failure ends nothing: the second sender's claim holds
    claimed = state(app, message_id)
    assert (claimed.state, claimed.attempts, claimed.next_attempt_at) == ("sending", 2, START + 2 * outbox.LEASE)


def test_a_message_a_sender_finds_not_due_yet_is_the_sweeps_once_it_is(app, server, clock):
    with app.app_context():
        message_id = outbox.add("password_reset", "alice@example.com", "event:1", RESET, START)
        outbox.handed_over([message_id], START)  # published by its commit
        db.session.commit()
    clock.now = START - timedelta(seconds=1)  # this worker's clock is a second behind the web server's

    assert send(app, message_id) is None
    clock.now = START
    with app.app_context():
        assert jobs.sweep() == 1  # at once, not HAND_OVER_AGAIN_AFTER later
    assert len(server.received) == 1


def test_a_savepoint_hands_nothing_over_before_its_transaction_commits(app, monkeypatch):
    app.config["JOBS_AFTER_COMMIT"] = True
    handed = []
    monkeypatch.setattr(app.extensions["jobs"], "hand_over", handed.append)  # what the runner is given, when
    with app.app_context():
        with db.session.begin_nested():
            message_id = outbox.add("password_reset", "alice@example.com", "event:1", RESET, START)
        assert handed == []  # no sender could see it yet
        db.session.commit()
    assert handed == [[message_id]]


def test_the_sweep_sends_every_due_message_and_no_other(app, server, clock):
    due = [queue(app, f"event:{number}", START - timedelta(minutes=number)) for number in range(3)]
    later = queue(app, "event:later", START + timedelta(minutes=1))

    with app.app_context():
        assert jobs.sweep() == 3

    assert sorted(received.message["Message-ID"] for received in server.received) == sorted(
        f"<{message_id}@finstack.example>" for message_id in due
    )
    assert state(app, later).state == "pending"


def test_the_sweep_hands_over_every_due_message_once_batch_after_batch(app, clock):
    queued = {queue(app, f"event:{number}") for number in range(5)}
    handed = []

    with app.app_context():
        assert jobs.sweep(send=handed.append, batch_size=2) == 5
        assert jobs.sweep(send=handed.append, batch_size=2) == 0  # the workers have them: no second copy queued

        clock.now += outbox.HAND_OVER_AGAIN_AFTER  # still not sent: handed over again, as the broker lost them
        assert jobs.sweep(send=handed.append, batch_size=2) == 5
    assert sorted(handed) == sorted([*queued, *queued])


def test_a_message_the_sweep_could_not_hand_over_is_the_next_sweeps(app, clock):
    refused, taken = queue(app, "event:refused"), queue(app, "event:taken")
    handed = []

    def send(message_id) -> None:
        if message_id == refused:
            raise ConnectionError("the broker is away")
        handed.append(message_id)

    with app.app_context():
        assert jobs.sweep(send=send) == 1
        assert jobs.sweep(send=handed.append) == 1
    assert handed == [taken, refused]


def test_in_development_a_message_is_written_as_an_eml_file(app, clock, tmp_path):
    app.config.update(MAIL_BACKEND="file", MAIL_DIR=str(tmp_path / "mail"))
    message_id = queue(app)

    assert send(app, message_id) == "sent"

    [written] = (tmp_path / "mail").glob("*.eml")
    message = message_from_bytes(written.read_bytes(), policy=policy.default)
    assert message["To"] == "alice@example.com" and str(message_id) in message["Message-ID"]


def test_with_email_disabled_a_message_is_dropped_without_a_sender_address(app, clock):
    app.config.update(MAIL_BACKEND="disabled", MAIL_FROM=None)  # production's opt-out, with nothing else set
    message_id = queue(app)

    assert send(app, message_id) == "sent"


def test_a_message_that_cannot_be_built_waits_for_its_next_attempt_with_the_error(app, clock):
    with app.app_context():
        message_id = outbox.add("no_such_template", "alice@example.com", "event:1", {}, START)
        db.session.commit()

    assert send(app, message_id) == "pending"
    assert "TemplateNotFound" in state(app, message_id).last_error
