"""Account flows by email (routes/accounts.py): a forgotten password reset by a link, and a new email address confirmed
by one. The email is read back as its recipient would (the ``mailbox`` fixture); the clock is the module's
``utcnow``; the token functions themselves (tokens.py) are tested at the end."""

import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

import tokens
from config import parse_domains
from helpers import PASSWORD, POSTGRES_URL, assert_error, tokens_for
from models import OneTimeToken, OutboxMessage, User, db, utcnow

NEW_PASSWORD = "a-new-long-passphrase"
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
LINK = re.compile(r"http://localhost:4200/(reset-password|confirm-email-change)\?token=([A-Za-z0-9_-]+)")


def forgot(client, email: str = "alice@example.com", **kwargs):
    return client.post("/api/auth/forgot-password", json={"email": email}, **kwargs)


def reset(client, token: str, password: str = NEW_PASSWORD):
    return client.post("/api/auth/reset-password", json={"token": token, "password": password})


def login(client, username: str = "alice", password: str = NEW_PASSWORD):
    return client.post("/api/auth/login", json={"username": username, "password": password})


def parts(message) -> tuple[str, str]:
    """The plain text and the HTML of an email."""
    return message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()


def link_token(message, page: str) -> str:
    """The token of the email's one link to ``page``, the same in both parts."""
    plain, html = parts(message)
    found = {match.group(2) for match in LINK.finditer(plain + html) if match.group(1) == page}
    assert len(found) == 1, (plain, html)
    return found.pop()


def reset_link(client, mailbox, email: str = "alice@example.com") -> str:
    assert forgot(client, email).status_code == 202
    [message] = mailbox.deliver()
    return link_token(message, "reset-password")


def set_clock(monkeypatch, now: datetime) -> None:
    monkeypatch.setattr("routes.accounts.utcnow", lambda: now)


# Password reset


def test_a_reset_link_by_email_sets_a_new_password(client, user, mailbox):
    response = forgot(client, "  Alice@Example.COM ")  # addresses match in any case, trimmed

    assert response.status_code == 202
    assert set(response.get_json()) == {"message"}
    [message] = mailbox.deliver()
    assert message["To"] == "alice@example.com"
    assert message["Subject"] == "Reset your FinStack password"
    plain, html = parts(message)
    for part in (plain, html):
        assert "Hello Alice Adams" in part
        assert "valid for 1 hour" in part and "works once" in part
        assert "If you did not ask for this, ignore this email" in part
    token = link_token(message, "reset-password")

    response = reset(client, token)

    assert response.status_code == 200, response.get_json()
    assert "sign in with your new password" in response.get_json()["message"]
    assert login(client).status_code == 200
    assert_error(login(client, password=PASSWORD), 401)


def test_forgot_password_answers_alike_and_runs_the_same_statements_for_any_address(
    client, user, make_user, mailbox, sql_statements
):
    make_user("carol", is_active=False)
    forgot(client, "warm-up@example.com")  # whatever a first request reads once
    answers, statements = {}, {}
    cases = {"active": "alice@example.com", "unknown": "nobody@example.com", "inactive": "carol@example.com"}
    for case, email in cases.items():
        with sql_statements() as executed:
            response = forgot(client, email)
        answers[case] = (response.status_code, response.get_json(), response.headers.get("Content-Length"))
        statements[case] = executed

    assert answers["active"] == answers["unknown"] == answers["inactive"]
    assert answers["active"][0] == 202
    assert statements["active"] == statements["unknown"] == statements["inactive"]
    assert len(statements["active"]) == 3  # the account, the token, the email
    messages = {message["To"]: message for message in mailbox.deliver()}
    assert "reset-password?token=" in parts(messages["alice@example.com"])[0]
    for stranger in ("nobody@example.com", "carol@example.com"):  # told, with nothing to follow
        notice = messages[stranger]
        assert notice["Subject"] == "Password reset requested at FinStack"
        plain, html = parts(notice)
        assert "no active account uses it" in plain and "no active account uses it" in html
        assert "token" not in plain + html and "http" not in plain


def test_a_reset_link_works_once(client, user, mailbox):
    token = reset_link(client, mailbox)

    assert reset(client, token).status_code == 200
    body = assert_error(reset(client, token, "yet-another-passphrase"), 400, "token")

    assert "not valid" in body["error"]
    assert login(client).status_code == 200


def test_a_reset_link_expires_after_an_hour(client, user, mailbox, monkeypatch):
    set_clock(monkeypatch, NOW)
    token = reset_link(client, mailbox)

    set_clock(monkeypatch, NOW + timedelta(hours=1))
    assert_error(reset(client, token), 400, "token")
    set_clock(monkeypatch, NOW + timedelta(minutes=59, seconds=59))
    assert reset(client, token).status_code == 200


def test_every_unusable_token_gets_the_same_answer(app, client, user, mailbox):
    used, revoked = reset_link(client, mailbox), reset_link(client, mailbox)
    assert reset(client, used).status_code == 200  # which revokes the other
    with app.app_context():
        _row, other_purpose = tokens.issue(
            "email_change", "alice@example.com", lifetime=timedelta(hours=1), now=datetime.now(UTC),
            user_id=uuid.UUID(user["id"]),
        )  # fmt: skip
        db.session.commit()

    answers = {
        reset(client, token).get_data(as_text=True)
        for token in (used, revoked, other_purpose, "not-a-token", revoked[:-1], "x" * 100)
    }

    assert len(answers) == 1
    assert_error(reset(client, "not-a-token"), 400, "token")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": NEW_PASSWORD}, "token"),
        ({"token": "", "password": NEW_PASSWORD}, "token"),
        ({"token": "t" * 201, "password": NEW_PASSWORD}, "token"),
        ({"token": 42, "password": NEW_PASSWORD}, "token"),
        ({"token": "t"}, "password"),
        ({"token": "t", "password": "short"}, "password"),
    ],
)
def test_reset_refuses_bad_input(client, body, field):
    assert_error(client.post("/api/auth/reset-password", json=body), 400, field)


@pytest.mark.parametrize("body", [{}, {"email": "not-an-email"}, {"email": None}, {"email": "a@b.c", "x": 1}])
def test_forgot_password_refuses_bad_input(client, body, mailbox):
    response = client.post("/api/auth/forgot-password", json=body)

    assert_error(response, 400)
    assert mailbox.deliver() == []


def test_a_password_the_rules_refuse_leaves_the_link_usable(client, user, mailbox):
    token = reset_link(client, mailbox)

    assert_error(reset(client, token, "alice@example.com"), 400, "password")  # the account's own address

    assert reset(client, token).status_code == 200


def test_a_reset_logs_out_every_session_and_revokes_the_other_links(app, client, user, mailbox):
    sessions = [tokens_for(app, user["id"]) for _ in range(2)]
    first, second = reset_link(client, mailbox), reset_link(client, mailbox)

    assert reset(client, second).status_code == 200  # an older link works too, until one is used

    for session in sessions:
        assert_error(client.get("/api/auth/me", headers={"Authorization": f"Bearer {session['access_token']}"}), 401)
        refreshed = client.post("/api/auth/refresh", headers={"Authorization": f"Bearer {session['refresh_token']}"})
        assert_error(refreshed, 401)
    assert_error(reset(client, first, "yet-another-passphrase"), 400, "token")


def test_changing_the_password_revokes_reset_links(client, user, auth_headers, mailbox):
    token = reset_link(client, mailbox)

    changed = client.put(
        "/api/auth/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}, headers=auth_headers
    )

    assert changed.status_code == 200
    assert_error(reset(client, token, "yet-another-passphrase"), 400, "token")
    assert login(client).status_code == 200


def test_a_reset_verifies_an_unverified_address(app, client, make_user, mailbox):
    waiting = make_user("dana", email_verified_at=None)

    reset(client, reset_link(client, mailbox, "dana@example.com"))

    with app.app_context():
        assert db.session.get(User, uuid.UUID(waiting["id"])).email_verified_at is not None


@pytest.mark.parametrize("how", ["reset", "change"])
def test_a_new_password_ends_a_pending_email_change(client, user, auth_headers, mailbox, how):
    """Someone who got hold of the session and asked to move the account to their address loses that link when the
    owner sets a new password, by reset or by change: or they could confirm it and then reset to their own inbox."""
    stolen = confirmation_link(client, auth_headers, mailbox, "intruder@example.org")
    if how == "reset":
        assert reset(client, reset_link(client, mailbox)).status_code == 200
    else:
        body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
        assert client.put("/api/auth/password", json=body, headers=auth_headers).status_code == 200

    assert_error(confirm(client, stolen), 400, "token")
    assert login(client).get_json()["user"]["email"] == "alice@example.com"


def test_a_reset_ends_the_verification_link_which_signs_nobody_in(app, client, make_user, mailbox):
    waiting = make_user("dana", email_verified_at=None)
    with app.app_context():
        _, raw = tokens.issue(
            "email_verification", "dana@example.com", lifetime=timedelta(hours=48), now=utcnow(),
            user_id=uuid.UUID(waiting["id"]),
        )  # fmt: skip
        db.session.commit()

    assert reset(client, reset_link(client, mailbox, "dana@example.com")).status_code == 200
    refused = client.post("/api/auth/verify-email", json={"token": raw})

    assert list(assert_error(refused, 400)["details"]) == ["token"]  # and no tokens of a session


def test_a_deactivated_account_cannot_use_a_link_it_was_sent(app, client, user, mailbox):
    token = reset_link(client, mailbox)
    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).is_active = False
        db.session.commit()

    assert_error(reset(client, token), 400, "token")


@pytest.mark.app_config(RATELIMIT_ACCOUNT_EMAIL="2 per hour", RATELIMIT_LOGIN="100 per minute")
def test_forgot_password_is_limited_per_address_asked_for_alike_for_any_address(
    client, user, mailbox, rate_limit_storage
):
    for email in ("alice@example.com", "nobody@example.com"):
        assert [forgot(client, email).status_code for _ in range(2)] == [202, 202]
        body = assert_error(forgot(client, email.upper()), 429)
        assert body["details"]["limit"] == "2 per hour"
        assert body["error"] == "Too many emails to this address lately; try again later."

    assert forgot(client, "carol@example.com").status_code == 202  # another address
    assert len(mailbox.deliver()) == 5


@pytest.mark.app_config(RATELIMIT_LOGIN="2 per minute")
def test_forgot_password_is_limited_per_client_address(client, rate_limit_storage):
    addresses = [f"person{number}@example.com" for number in range(3)]

    statuses = [forgot(client, email).status_code for email in addresses]
    other_client = forgot(client, "person9@example.com", environ_base={"REMOTE_ADDR": "10.0.0.9"})

    assert statuses == [202, 202, 429]
    assert other_client.status_code == 202


@pytest.mark.own_database  # two connections, with real commits
def test_of_two_resets_with_one_link_at_once_one_succeeds(app, client, user, mailbox):
    token = reset_link(client, mailbox)
    answers = {}

    def second() -> None:
        answers["second"] = reset(client, token, "the-second-passphrase")

    with app.app_context():
        first = tokens.consume("password_reset", token, datetime.now(UTC))  # holds the row (or SQLite's write lock)
        other = threading.Thread(target=second)
        other.start()
        if POSTGRES_URL:
            wait_for_a_lock_wait()  # the second is queued behind the first, not merely later
        db.session.commit()
    other.join(10)

    assert first is not None
    assert_error(answers["second"], 400, "token")
    assert_error(login(client, password="the-second-passphrase"), 401)


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
    pytest.fail("the second use never waited for the first")


# Email change


def change_email(client, headers, email: str = "alice@example.org", password: str = PASSWORD):
    return client.post("/api/auth/me/email", json={"email": email, "password": password}, headers=headers)


def confirm(client, token: str):
    return client.post("/api/auth/confirm-email-change", json={"token": token})


def confirmation_link(client, headers, mailbox, email: str = "alice@example.org") -> str:
    assert change_email(client, headers, email).status_code == 202
    messages = {message["To"]: message for message in mailbox.deliver()}
    return link_token(messages[email], "confirm-email-change")


def test_a_new_address_is_confirmed_by_a_link_sent_to_it(app, client, user, auth_headers, mailbox):
    response = change_email(client, auth_headers, " Alice@Example.ORG ")

    assert response.status_code == 202
    assert "alice@example.org" in response.get_json()["message"]
    assert client.get("/api/auth/me", headers=auth_headers).get_json()["user"]["email"] == "alice@example.com"
    messages = {message["To"]: message for message in mailbox.deliver()}
    assert set(messages) == {"alice@example.org", "alice@example.com"}
    confirmation, notice = messages["alice@example.org"], messages["alice@example.com"]
    assert confirmation["Subject"] == "Confirm your new FinStack email address"
    assert notice["Subject"] == "A new email address was requested for your FinStack account"
    for part in parts(confirmation):
        assert "valid for 24 hours" in part and "alice@example.org" in part
    for part in parts(notice):
        assert "alice@example.org" in part and "change your password" in " ".join(part.split())
        assert "token" not in part  # nothing in it acts
    token = link_token(confirmation, "confirm-email-change")

    response = confirm(client, token)  # no sign-in needed: the link may be opened anywhere

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["user"]["email"] == "alice@example.org"
    assert response.get_json()["message"] == "Email address changed to alice@example.org."
    assert client.get("/api/auth/me", headers=auth_headers).get_json()["user"]["email"] == "alice@example.org"
    [changed] = mailbox.deliver()
    assert changed["To"] == "alice@example.com"
    assert changed["Subject"] == "Your FinStack email address was changed"
    assert all("alice@example.org" in part for part in parts(changed))
    with app.app_context():
        assert db.session.get(User, uuid.UUID(user["id"])).email_verified_at is not None
    assert_error(confirm(client, token), 400, "token")  # once


def test_an_email_change_needs_the_current_password(client, user, auth_headers, mailbox):
    body = assert_error(change_email(client, auth_headers, password="wrong-password"), 400, "password")

    assert body["details"]["password"] == ["Not your current password."]
    assert mailbox.deliver() == []


def test_an_email_change_to_the_current_or_a_taken_address_is_refused(client, user, other_user, auth_headers, mailbox):
    assert_error(change_email(client, auth_headers, "ALICE@example.com"), 400, "email")
    body = assert_error(change_email(client, auth_headers, "bob@example.com"), 409, "email")

    assert body["error"] == "This email is already registered."
    assert mailbox.deliver() == []


@pytest.mark.parametrize(
    "body",
    [{}, {"email": "alice@example.org"}, {"password": PASSWORD}, {"email": "nope", "password": PASSWORD}],
)
def test_an_email_change_refuses_bad_input(client, user, auth_headers, body):
    assert_error(client.post("/api/auth/me/email", json=body, headers=auth_headers), 400)


def test_an_email_change_needs_a_signed_in_user(client, user):
    assert_error(client.post("/api/auth/me/email", json={"email": "a@example.org", "password": PASSWORD}), 401)


def test_an_address_taken_before_the_confirmation_is_a_409_and_the_link_keeps(
    app, client, user, auth_headers, admin_headers, mailbox
):
    token = confirmation_link(client, auth_headers, mailbox)
    taken = {"username": "eve", "email": "alice@example.org", "full_name": "Eve", "password": "eve-passphrase"}
    assert client.post("/api/users", json=taken, headers=admin_headers).status_code == 201

    assert_error(confirm(client, token), 409, "email")

    assert client.get("/api/auth/me", headers=auth_headers).get_json()["user"]["email"] == "alice@example.com"
    with app.app_context():
        row = db.session.scalar(select(OneTimeToken).where(OneTimeToken.token_hash == tokens.hash_token(token)))
        assert row.used_at is None
        db.session.execute(User.__table__.delete().where(User.username == "eve"))
        db.session.commit()
    assert confirm(client, token).status_code == 200


def test_a_newer_email_change_replaces_the_earlier_link(client, user, auth_headers, mailbox):
    earlier = confirmation_link(client, auth_headers, mailbox, "alice@example.org")
    newer = confirmation_link(client, auth_headers, mailbox, "alice@example.net")

    assert_error(confirm(client, earlier), 400, "token")
    assert confirm(client, newer).get_json()["user"]["email"] == "alice@example.net"


def test_an_email_change_link_expires_after_24_hours(client, user, auth_headers, mailbox, monkeypatch):
    set_clock(monkeypatch, NOW)
    token = confirmation_link(client, auth_headers, mailbox)

    set_clock(monkeypatch, NOW + timedelta(hours=24))
    assert_error(confirm(client, token), 400, "token")
    set_clock(monkeypatch, NOW + timedelta(hours=23, minutes=59))
    assert confirm(client, token).status_code == 200


def test_reset_links_sent_to_the_old_address_die_with_the_change(client, user, auth_headers, mailbox):
    reset_token = reset_link(client, mailbox)

    assert confirm(client, confirmation_link(client, auth_headers, mailbox)).status_code == 200
    mailbox.deliver()  # the old address is told

    assert_error(reset(client, reset_token), 400, "token")
    assert reset(client, reset_link(client, mailbox, "alice@example.org")).status_code == 200


def test_a_reset_link_cannot_confirm_an_address_nor_the_reverse(client, user, auth_headers, mailbox):
    reset_token = reset_link(client, mailbox)
    change_token = confirmation_link(client, auth_headers, mailbox)

    assert_error(confirm(client, reset_token), 400, "token")
    assert_error(reset(client, change_token), 400, "token")


@pytest.mark.app_config(REGISTRATION="domain", ALLOWED_EMAIL_DOMAINS=parse_domains("example.com"))
def test_with_domain_registration_a_new_address_stays_in_the_domains(client, user, auth_headers, mailbox):
    body = assert_error(change_email(client, auth_headers, "alice@gmail.com"), 403, "email")

    assert "@example.com" in body["error"]
    assert change_email(client, auth_headers, "alice.adams@example.com").status_code == 202


@pytest.mark.app_config(RATELIMIT_ACCOUNT_EMAIL="1 per hour")
def test_confirmations_count_against_the_new_address_s_email_limit(client, user, auth_headers):
    assert forgot(client, "alice@example.org").status_code == 202

    assert_error(change_email(client, auth_headers, "alice@example.org"), 429)


def test_the_profile_keeps_its_address_and_sends_a_new_one_to_the_email_change(client, user, auth_headers):
    same = client.patch(
        "/api/users/me", json={"full_name": "Alice Ashdown", "email": "Alice@Example.com"}, headers=auth_headers
    )
    assert same.status_code == 200 and same.get_json()["user"]["full_name"] == "Alice Ashdown"

    body = assert_error(client.patch("/api/users/me", json={"email": "alice@example.org"}, headers=auth_headers), 400)

    assert "POST /api/auth/me/email" in body["error"] and "email" in body["details"]
    assert client.get("/api/auth/me", headers=auth_headers).get_json()["user"]["email"] == "alice@example.com"


def test_a_sent_email_leaves_no_usable_link_in_the_database(app, client, user, mailbox):
    raw = reset_link(client, mailbox)  # delivered: the link went out

    with app.app_context():
        payloads = db.session.scalars(select(OutboxMessage.payload)).all()
    assert payloads == [{}] and raw not in str(payloads)
    assert reset(client, raw).status_code == 200  # the link itself works, from the email only


# tokens.py


def test_a_token_is_stored_as_its_hash_only(app, user):
    with app.app_context():
        row, raw = tokens.issue("password_reset", "alice@example.com", lifetime=timedelta(hours=1), now=NOW)
        db.session.commit()
        stored = db.session.execute(select(OneTimeToken.__table__)).one()

    assert len(raw) == 43 and raw not in str(stored)
    assert stored.token_hash == tokens.hash_token(raw) and len(stored.token_hash) == 64
    assert row.expires_at == NOW + timedelta(hours=1)


def test_a_token_is_consumed_once_for_its_purpose_before_it_expires(app, user):
    with app.app_context():
        _row, raw = tokens.issue("invitation", "x@example.com", lifetime=timedelta(hours=1), now=NOW)

        assert tokens.consume("password_reset", raw, NOW) is None
        assert tokens.consume("invitation", raw, NOW + timedelta(hours=1)) is None
        assert tokens.find("invitation", raw, NOW) is not None
        assert tokens.consume("invitation", raw, NOW).used_at == NOW
        assert tokens.consume("invitation", raw, NOW) is None
        assert tokens.find("invitation", raw, NOW) is None


def test_revoking_leaves_other_accounts_and_purposes(app, user, other_user):
    alice, bob = uuid.UUID(user["id"]), uuid.UUID(other_user["id"])
    with app.app_context():
        issued = {
            name: tokens.issue(purpose, "a@example.com", lifetime=timedelta(hours=1), now=NOW, user_id=owner)
            for name, purpose, owner in (
                ("first", "password_reset", alice), ("second", "password_reset", alice),
                ("bob's", "password_reset", bob), ("change", "email_change", alice),
            )
        }  # fmt: skip

        assert tokens.revoke("password_reset", NOW, user_id=alice) == 2

        live = {name for name, (_row, raw) in issued.items() if tokens.find(row_purpose(name), raw, NOW)}
        assert live == {"bob's", "change"}
        assert tokens.revoke("email_change", NOW, email="a@example.com") == 1
        with pytest.raises(ValueError):
            tokens.revoke("password_reset", NOW)


def row_purpose(name: str) -> str:
    return "email_change" if name == "change" else "password_reset"


def test_the_outbox_holds_one_email_per_request(app, client, user):
    forgot(client)
    forgot(client, "nobody@example.com")

    with app.app_context():
        kinds = db.session.execute(select(OutboxMessage.kind, func.count()).group_by(OutboxMessage.kind)).all()
    assert dict(kinds) == {"password_reset": 1, "password_reset_no_account": 1}
