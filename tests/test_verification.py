"""Email verification (REGISTRATION=domain): the account waits unverified, login refuses it, the emailed link verifies
it and signs in, once, within 48 hours; asking for a new link reveals nothing and is limited; open registration is
as it was. On both databases."""

import re
import uuid
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from helpers import POSTGRES_URL, assert_error, queued_for_a_lock
from models import OneTimeToken, OutboxMessage, User, db
from routes import auth

DOMAIN = {"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": ("example.com",)}
ERIN = {"username": "erin", "email": "erin@example.com", "password": "erin-passphrase", "full_name": "Erin Ek"}
LOGIN = {"username": "erin", "password": "erin-passphrase"}
SESSION_FIELDS = {"message", "user", "access_token", "refresh_token"}
domain_mode = pytest.mark.app_config(**DOMAIN)


def token_in(message) -> str:
    """The token of the verification link in ``message``'s plain text, checked to be the same link as in its HTML."""
    text = message.get_body(("plain",)).get_content()
    link = re.search(r"http://localhost:4200/verify-email\?token=([A-Za-z0-9_-]+)", text)
    assert link is not None, text
    assert f'href="{link.group(0)}"' in message.get_body(("html",)).get_content()
    return link.group(1)


def register(client, **overrides):
    return client.post("/api/auth/register", json=ERIN | overrides)


def registered_token(client, mailbox) -> str:
    assert register(client).status_code == 201
    (message,) = mailbox.deliver()
    return token_in(message)


def verify(client, token: str):
    return client.post("/api/auth/verify-email", json={"token": token})


def resend(client, email: str = "erin@example.com"):
    return client.post("/api/auth/resend-verification", json={"email": email})


def clock(monkeypatch, now: datetime) -> None:
    monkeypatch.setattr(auth, "utcnow", lambda: now)


def links_sent(app) -> int:
    with app.app_context():
        query = sa.select(sa.func.count()).where(OutboxMessage.kind == "email_verification")
        return db.session.scalar(query)


@domain_mode
def test_domain_registration_waits_for_the_address_and_emails_a_link(client, app, mailbox):
    response = register(client)

    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"message", "user"}  # no tokens until the address is verified
    assert body["message"] == (
        "Account created. To sign in, verify your address: follow the link we sent to erin@example.com (it works for "
        "48 hours)."
    )
    assert body["user"]["email"] == "erin@example.com"
    with app.app_context():
        assert db.session.get(User, uuid.UUID(body["user"]["id"])).email_verified_at is None
    (message,) = mailbox.deliver()
    assert (message["To"], message["Subject"]) == ("erin@example.com", "Verify your email address for FinStack")
    for part in (message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()):
        assert "Hello Erin Ek," in part and "valid for 48 hours" in " ".join(part.split())
    assert token_in(message) not in str(body)


@domain_mode
def test_login_refuses_an_unverified_account_only_with_the_right_password(client, mailbox):
    register(client)

    refused = assert_error(client.post("/api/auth/login", json=LOGIN), 403)
    wrong = assert_error(client.post("/api/auth/login", json=LOGIN | {"password": "not-the-passphrase"}), 401)

    assert refused == {
        "error": "Verify your email address before signing in: follow the link we sent to erin@example.com, or ask "
        "for a new one.",
        "details": {"email": "erin@example.com", "email_verified": False},
    }
    assert wrong["error"] == "Invalid username or password."


@domain_mode
def test_the_link_verifies_the_address_and_signs_in(client, app, mailbox):
    token = registered_token(client, mailbox)

    response = verify(client, token)

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == SESSION_FIELDS
    assert body["message"] == "Email address verified: welcome."
    me = client.get("/api/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.get_json()["user"]["username"] == "erin"
    assert client.post("/api/auth/login", json=LOGIN).status_code == 200
    with app.app_context():
        assert db.session.get(User, uuid.UUID(body["user"]["id"])).email_verified_at is not None


@domain_mode
def test_a_verification_link_works_once(client, mailbox):
    token = registered_token(client, mailbox)
    assert verify(client, token).status_code == 200

    again = assert_error(verify(client, token), 400)

    assert again == {"error": auth.INVALID_VERIFICATION, "details": {"token": ["Not a valid verification token."]}}


@domain_mode
def test_a_verification_link_expires_after_48_hours(client, app, mailbox, monkeypatch):
    token = registered_token(client, mailbox)
    with app.app_context():
        expires_at = db.session.scalar(sa.select(OneTimeToken.expires_at))

    clock(monkeypatch, expires_at)
    assert assert_error(verify(client, token), 400)["error"] == auth.INVALID_VERIFICATION
    clock(monkeypatch, expires_at - timedelta(seconds=1))
    assert verify(client, token).status_code == 200
    with app.app_context():
        created_at = db.session.scalar(sa.select(OneTimeToken.created_at))
    assert expires_at - created_at == timedelta(hours=48)


@pytest.mark.parametrize("token", ["no-such-token", "x" * 128])
def test_an_unknown_token_is_a_400_with_the_same_message(client, token):
    body = assert_error(verify(client, token), 400)

    assert body["error"] == auth.INVALID_VERIFICATION


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": "x" * 129}, {"token": 7}, {"token": "t", "more": 1}])
def test_a_malformed_verification_is_a_400(client, body):
    assert_error(client.post("/api/auth/verify-email", json=body), 400)


@domain_mode
def test_a_link_to_an_address_the_account_no_longer_has_does_not_verify_it(client, app, mailbox):
    token = registered_token(client, mailbox)
    with app.app_context():
        db.session.execute(sa.update(User).values(email="erin@corp.example.com"))
        db.session.commit()

    assert assert_error(verify(client, token), 400)["error"] == auth.INVALID_VERIFICATION


@domain_mode
def test_a_deactivated_account_cannot_sign_in_with_its_link(client, app, mailbox):
    token = registered_token(client, mailbox)
    with app.app_context():
        db.session.execute(sa.update(User).values(is_active=False))
        db.session.commit()

    assert_error(verify(client, token), 403)


@domain_mode
def test_asking_for_a_new_link_answers_alike_and_runs_the_same_statements_for_any_address(
    client, app, mailbox, user, make_user, sql_statements
):
    register(client)
    make_user("carol", is_active=False)
    mailbox.deliver()
    resend(client, "warm-up@example.com")  # whatever a first request reads once
    answers, statements = {}, {}
    cases = {
        "waiting": "erin@example.com", "unknown": "nobody@example.com", "verified": user["email"],
        "inactive": "carol@example.com",
    }  # fmt: skip
    for case, email in cases.items():
        with sql_statements() as executed:
            response = resend(client, email)
        answers[case] = (response.status_code, response.get_json(), response.headers.get("Content-Length"))
        statements[case] = executed

    assert answers["waiting"] == answers["unknown"] == answers["verified"] == answers["inactive"]
    assert answers["waiting"][:2] == (202, {"message": auth.RESEND_ANSWER})
    assert statements["waiting"] == statements["unknown"] == statements["verified"] == statements["inactive"]
    assert len(statements["waiting"]) == 4  # the account, the earlier links revoked, the token, the email
    messages = {message["To"]: message for message in mailbox.deliver() if message["To"] != "warm-up@example.com"}
    assert verify(client, token_in(messages.pop("erin@example.com"))).status_code == 200
    assert set(messages) == {"nobody@example.com", user["email"], "carol@example.com"}
    for notice in messages.values():  # told, with nothing to follow
        assert notice["Subject"] == "Address verification requested at FinStack"
        plain, html = (notice.get_body((kind,)).get_content() for kind in ("plain", "html"))
        assert "no account is waiting for verification" in plain and "no account is waiting for" in html
        assert "token" not in plain + html and "http" not in plain


@domain_mode
def test_a_new_link_replaces_the_earlier_one(client, mailbox):
    first = registered_token(client, mailbox)
    resend(client, "ERIN@Example.com")
    (message,) = mailbox.deliver()

    assert_error(verify(client, first), 400)
    assert verify(client, token_in(message)).status_code == 200
    assert resend(client).status_code == 202  # verified now: no link is sent any more
    (notice,) = mailbox.deliver()
    assert "verify-email" not in notice.get_body(("plain",)).get_content()


@pytest.mark.app_config(**DOMAIN, RATELIMIT_ACCOUNT_EMAIL="2 per hour")
def test_asking_for_links_is_limited_per_address_alike_for_any_address(client, mailbox, rate_limit_storage):
    assert register(client).status_code == 201
    for email in ("erin@example.com", "nobody@example.com"):
        assert [resend(client, email).status_code for _ in range(2)] == [202, 202]
        body = assert_error(resend(client, email.upper()), 429)
        assert body["details"]["limit"] == "2 per hour"
        assert body["error"] == "Too many emails to this address lately; try again later."

    assert resend(client, "carol@example.com").status_code == 202  # another address
    assert len(mailbox.deliver()) == 6  # the registration's link, and one email for each 202


def test_outside_domain_mode_asking_for_a_link_sends_nothing(client, mailbox, user):
    for email in ("nobody@example.com", user["email"]):
        response = resend(client, email)
        assert (response.status_code, response.get_json()) == (202, {"message": auth.RESEND_ANSWER})
    assert mailbox.deliver() == []


@domain_mode
def test_an_address_outside_the_domains_is_refused_as_registration_refuses_it(client, mailbox):
    body = assert_error(resend(client, "someone@elsewhere.org"), 403, "email")
    assert "@example.com" in body["details"]["email"][0]
    assert mailbox.deliver() == []


@domain_mode
@pytest.mark.own_database  # two requests on two connections, with real commits
def test_following_a_link_while_asking_for_another_never_deadlocks(app, client, mailbox):
    """Both lock the account before its links (tokens.consume_for_account). Taken the other way round, the link's use
    held its token while it waited for the account, which the resend held while it waited to revoke that token: a
    deadlock, and one of the two a 503."""
    token = registered_token(client, mailbox)
    send = {"resend": resend, "verify": lambda client: verify(client, token)}  # the resend first
    account = sa.select(User).where(User.email == "erin@example.com").with_for_update()

    results = queued_for_a_lock(app, lambda: db.session.execute(account), send)

    assert results["resend"].status_code == 202, results["resend"].get_json()
    assert results["verify"].status_code in (200, 400), results["verify"].get_json()
    if POSTGRES_URL:  # the resend had the account first, and replaced the link before it could be used
        assert results["verify"].get_json()["error"] == auth.INVALID_VERIFICATION


@domain_mode
def test_a_deactivated_account_is_sent_no_link(client, app, mailbox):
    register(client)
    mailbox.deliver()
    with app.app_context():
        db.session.execute(sa.update(User).values(is_active=False))
        db.session.commit()

    assert resend(client).status_code == 202
    (notice,) = mailbox.deliver()
    assert "verify-email" not in notice.get_body(("plain",)).get_content()


@pytest.mark.parametrize("body", [{}, {"email": "not-an-address"}, {"email": None}, {"email": "a@example.com", "x": 1}])
def test_a_malformed_request_for_a_link_is_a_400(client, body):
    assert_error(client.post("/api/auth/resend-verification", json=body), 400)


@pytest.mark.app_config(RATELIMIT_REGISTER="2 per minute")
def test_links_are_limited_per_client_like_registration(client):
    assert [resend(client, f"n{n}@example.com").status_code for n in range(3)] == [202, 202, 429]
    assert [verify(client, f"guess-{n}").status_code for n in range(3)] == [400, 400, 429]


def test_open_registration_signs_in_at_once_and_sends_nothing(client, app, mailbox):
    response = register(client)

    assert response.status_code == 201
    assert set(response.get_json()) == SESSION_FIELDS
    assert response.get_json()["message"] == "Registration successful."
    assert client.post("/api/auth/login", json=LOGIN).status_code == 200
    assert mailbox.deliver() == []
    with app.app_context():
        assert db.session.scalar(sa.select(User.email_verified_at)) is not None


@domain_mode
def test_accounts_an_administrator_creates_in_domain_mode_are_verified(client, admin_headers, mailbox):
    assert client.post("/api/users", json=ERIN | {"email": "erin@gmail.com"}, headers=admin_headers).status_code == 201

    assert client.post("/api/auth/login", json=LOGIN).status_code == 200
    assert mailbox.deliver() == []


@domain_mode
def test_a_duplicate_domain_registration_sends_nothing(client, user, app):
    assert_error(register(client, username=user["username"]), 409, "username")

    assert links_sent(app) == 0
