"""Sessions: refresh tokens that rotate, reuse detection, logout, password changes, and the blocklist behind them."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from flask_jwt_extended import create_access_token, create_refresh_token, decode_token
from sqlalchemy import func, select
from werkzeug.security import generate_password_hash

import outbox
from helpers import FAST_HASH, PASSWORD, assert_error, tokens_for
from models import LoginSession, OneTimeToken, OutboxMessage, RevokedToken, User, db
from tokens import issue as issue_link


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def login(client, username="alice", password=PASSWORD) -> dict:
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def works(client, access_token: str) -> bool:
    status = client.get("/api/auth/me", headers=bearer(access_token)).status_code
    assert status in (200, 401)
    return status == 200


def refresh(client, refresh_token: str, **kwargs):
    return client.post("/api/auth/refresh", headers=bearer(refresh_token), **kwargs)


def test_login_returns_a_refresh_token_valid_30_days_in_the_same_session(app, client, user):
    body = login(client)

    with app.app_context():
        access, refresh_claims = decode_token(body["access_token"]), decode_token(body["refresh_token"])
    assert refresh_claims["type"] == "refresh"
    assert refresh_claims["sub"] == user["id"]
    assert refresh_claims["exp"] - refresh_claims["iat"] == 30 * 24 * 3600
    assert access["sid"] == refresh_claims["sid"]


def test_refresh_with_the_bearer_header_rotates_both_tokens(client, user):
    first = login(client)

    response = refresh(client, first["refresh_token"])

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"access_token", "refresh_token"}
    assert body["refresh_token"] != first["refresh_token"]
    assert works(client, body["access_token"])
    assert refresh(client, body["refresh_token"]).status_code == 200  # the new one refreshes in turn


def test_refresh_with_the_token_in_the_body_ignores_the_header(client, user):
    """The Angular interceptor sends the (maybe expired) access token on every call, this one included."""
    first = login(client)

    response = client.post(
        "/api/auth/refresh", json={"refresh_token": first["refresh_token"]}, headers=bearer("expired.access.token")
    )

    assert response.status_code == 200
    assert works(client, response.get_json()["access_token"])


@pytest.mark.parametrize(
    "kind", ["access token", "nothing", "garbage", "expired", "other key", "empty body field", "no session"]
)
def test_refresh_refuses_anything_but_a_live_refresh_token(app, client, user, kind):
    tokens = login(client)
    with app.app_context():
        account = db.session.get(User, uuid.UUID(user["id"]))
        sid = {"sid": decode_token(tokens["refresh_token"])["sid"]}
        expired = create_refresh_token(account, additional_claims=sid, expires_delta=timedelta(seconds=-1))
        sessionless = create_refresh_token(account)
    app.config["JWT_SECRET_KEY"] = "another-key-0123456789-0123456789-0123456789"
    with app.app_context():
        other_key = create_refresh_token(account, additional_claims=sid)
    app.config["JWT_SECRET_KEY"] = "test-jwt-secret-key-0123456789-0123456789-0123456789"
    requests = {
        "access token": {"headers": bearer(tokens["access_token"])},
        "nothing": {},
        "garbage": {"headers": bearer("not-a-token")},
        "expired": {"headers": bearer(expired)},
        "other key": {"headers": bearer(other_key)},
        "empty body field": {"json": {"refresh_token": ""}},
        "no session": {"headers": bearer(sessionless)},
    }

    response = client.post("/api/auth/refresh", **requests[kind])

    if kind == "empty body field":
        assert_error(response, 400, "refresh_token")
    else:
        assert_error(response, 401)
    assert refresh(client, tokens["refresh_token"]).status_code == 200  # the real one still works


def test_a_refresh_token_used_twice_revokes_its_whole_session(client, user):
    first = login(client)
    elsewhere = login(client)  # another device: a session of its own
    second = refresh(client, first["refresh_token"]).get_json()

    reused = refresh(client, first["refresh_token"])

    body = assert_error(reused, 401)
    assert "already used" in body["error"]
    assert not works(client, first["access_token"])
    assert not works(client, second["access_token"])
    assert_error(refresh(client, second["refresh_token"]), 401)
    assert works(client, elsewhere["access_token"])
    assert refresh(client, elsewhere["refresh_token"]).status_code == 200


def test_refresh_of_a_deactivated_user_is_refused(app, client, user):
    tokens = login(client)
    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).is_active = False
        db.session.commit()

    assert_error(refresh(client, tokens["refresh_token"]), 401)


def test_tokens_that_belong_to_no_session_are_refused(app, client, user):
    with app.app_context():
        token = create_access_token(db.session.get(User, uuid.UUID(user["id"])))

    assert_error(client.get("/api/auth/me", headers=bearer(token)), 401)


def test_logout_revokes_the_access_token_and_its_refresh_token(client, user):
    tokens = login(client)
    other = login(client)
    refreshed = refresh(client, other["refresh_token"]).get_json()

    response = client.post("/api/auth/logout", headers=bearer(tokens["access_token"]))

    assert response.status_code == 200
    assert response.get_json() == {"message": "Logged out."}
    body = assert_error(client.get("/api/tasks", headers=bearer(tokens["access_token"])), 401)
    assert "revoked" in body["error"]
    assert_error(refresh(client, tokens["refresh_token"]), 401)
    assert works(client, refreshed["access_token"])  # other sessions carry on


def test_logout_ends_every_access_token_of_the_session(client, user):
    """An access token from before a refresh is still within its 24 hours: logging out must end it too."""
    tokens = login(client)
    refreshed = refresh(client, tokens["refresh_token"]).get_json()

    assert client.post("/api/auth/logout", headers=bearer(refreshed["access_token"])).status_code == 200

    assert not works(client, tokens["access_token"])
    assert_error(refresh(client, refreshed["refresh_token"]), 401)


def test_logout_with_the_refresh_token_works_too(client, user):
    tokens = login(client)

    assert client.post("/api/auth/logout", headers=bearer(tokens["refresh_token"])).status_code == 200

    assert not works(client, tokens["access_token"])


def test_logout_is_stored_in_the_database_for_every_worker(app, client, user):
    tokens = login(client)
    client.post("/api/auth/logout", headers=bearer(tokens["access_token"]))

    with app.app_context():
        access, refresh_claims = decode_token(tokens["access_token"]), decode_token(tokens["refresh_token"])
        revoked = set(db.session.scalars(select(RevokedToken.jti)))
    assert {access["jti"], access["sid"]} <= revoked
    assert refresh_claims["sid"] == access["sid"]


def test_logout_needs_a_live_token(client, user):
    tokens = login(client)
    client.post("/api/auth/logout", headers=bearer(tokens["access_token"]))

    assert_error(client.post("/api/auth/logout", headers=bearer(tokens["access_token"])), 401)
    assert_error(client.post("/api/auth/logout"), 401)


def change_password(client, token, current=PASSWORD, new="brand-new-passphrase"):
    return client.put(
        "/api/auth/password", json={"current_password": current, "new_password": new}, headers=bearer(token)
    )


def test_changing_the_password_logs_out_every_other_session(client, user):
    here, there = login(client), login(client)

    response = change_password(client, here["access_token"])

    assert response.status_code == 200
    assert response.get_json()["sessions_ended"] == 1
    assert works(client, here["access_token"])
    assert refresh(client, here["refresh_token"]).status_code == 200
    assert not works(client, there["access_token"])
    assert_error(refresh(client, there["refresh_token"]), 401)
    assert client.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 401
    assert login(client, password="brand-new-passphrase")


@pytest.mark.parametrize(
    ("current", "new", "field"),
    [
        ("wrong-password", "brand-new-passphrase", "current_password"),
        (PASSWORD, "short", "new_password"),
        (PASSWORD, "alice", "new_password"),
        (PASSWORD, "Alice@Example.com", "new_password"),
        (PASSWORD, PASSWORD, "new_password"),
        (PASSWORD, "x" * 129, "new_password"),
    ],
)
def test_a_refused_password_change_changes_nothing(app, client, user, current, new, field):
    here, there = login(client), login(client)

    assert_error(change_password(client, here["access_token"], current, new), 400, field)

    assert works(client, there["access_token"])
    assert login(client, password=PASSWORD)


def test_changing_the_password_needs_an_access_token(client, user):
    tokens = login(client)

    assert_error(change_password(client, tokens["refresh_token"]), 401)
    assert_error(client.put("/api/auth/password", json={"current_password": PASSWORD, "new_password": "x" * 10}), 401)


def test_purge_tokens_removes_only_expired_rows(app, runner, user):
    now = datetime.now(UTC)
    month = timedelta(days=30)
    with app.app_context():
        for email, expired in (
            ("old@example.com", now - month - timedelta(minutes=1)),
            ("kept@example.com", now - month + timedelta(minutes=1)),
        ):
            issue_link("password_reset", email, lifetime=timedelta(hours=1), now=expired - timedelta(hours=1))
        for key, sent_at in (
            ("old", now - month - timedelta(minutes=1)),
            ("kept", now - month + timedelta(minutes=1)),
            ("failed", None),
        ):
            queued = outbox.add("password_reset", f"{key}@example.com", key, {}, now - 2 * month)
            message = db.session.get(OutboxMessage, queued)
            message.state, message.sent_at = ("sent", sent_at) if sent_at else ("failed", None)
        for jti, expires_at in (("old-token", now - timedelta(seconds=1)), ("live-token", now + timedelta(hours=1))):
            db.session.add(RevokedToken(jti=jti, expires_at=expires_at))
        for refresh_jti, expires_at in (("old", now - timedelta(days=1)), ("live", now + timedelta(days=1))):
            db.session.add(LoginSession(user_id=uuid.UUID(user["id"]), refresh_jti=refresh_jti, expires_at=expires_at))
        db.session.commit()

    result = runner.invoke(args=["purge-tokens"])

    assert result.exit_code == 0, result.output
    assert (
        "Purged 1 expired blocklist entries, 1 expired login sessions, 1 emailed links expired over 30 days ago and 1 "
        "emails sent over 30 days ago." in result.output
    )
    with app.app_context():
        assert set(db.session.scalars(select(RevokedToken.jti))) == {"live-token"}
        assert set(db.session.scalars(select(LoginSession.refresh_jti))) == {"live"}
        assert set(db.session.scalars(select(OneTimeToken.email))) == {"kept@example.com"}
        assert set(db.session.scalars(select(OutboxMessage.event_key))) == {"kept", "failed"}


@pytest.mark.app_config(PASSWORD_HASH_METHOD="pbkdf2:sha256:1000")
def test_a_weaker_stored_hash_is_upgraded_at_the_next_successful_login(app, client, user):
    def stored_hash():
        with app.app_context():
            return db.session.get(User, uuid.UUID(user["id"])).password_hash

    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).password_hash = generate_password_hash(PASSWORD, FAST_HASH)
        db.session.commit()
    client.post("/api/auth/login", json={"username": "alice", "password": "wrong-password"})
    assert stored_hash().startswith(FAST_HASH + "$")  # a wrong password proves nothing: no change

    login(client)

    assert stored_hash().startswith("pbkdf2:sha256:1000$")
    assert login(client)  # and the upgraded hash checks


def test_register_starts_a_session_too(app, client):
    new = {"username": "carol", "email": "carol@example.com", "password": "s3cret-passphrase", "full_name": "Carol"}

    body = client.post("/api/auth/register", json=new).get_json()

    assert refresh(client, body["refresh_token"]).status_code == 200
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(LoginSession)) == 1


def test_tokens_for_makes_tokens_as_login_does(app, client, user):
    tokens = tokens_for(app, user["id"])

    assert works(client, tokens["access_token"])
    assert refresh(client, tokens["refresh_token"]).status_code == 200


def test_login_and_password_change_lock_the_account_row(app, client, user, sql_statements):
    """So a password change or deactivation and a login at the same moment cannot both win: PostgreSQL locks the
    row (SQLite's transactions take the whole database's write lock from their start)."""
    with sql_statements() as statements:
        tokens = login(client)
        assert change_password(client, tokens["access_token"]).status_code == 200

    with app.app_context():
        postgres = db.engine.dialect.name == "postgresql"
    locking = [s for s in statements if "FROM app_users" in s and "FOR NO KEY UPDATE" in s]
    assert len(locking) == (2 if postgres else 0), statements
