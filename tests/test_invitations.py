"""Invitations (routes/invitations.py): administrators invite by email, the person invited accepts with the link's
token, once, within 7 days, in every REGISTRATION mode; revoking, replacing, listing; on both databases."""

import hashlib
import re
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

import tokens
from helpers import POSTGRES_URL, assert_error, lock_waits, queued_for_a_lock, token_for
from models import OneTimeToken, OutboxMessage, User, db
from routes import invitations

ERIN = {"email": "erin@example.com"}
ACCEPT = {"username": "erin", "full_name": "Erin Ek", "password": "erin-passphrase"}
SESSION_FIELDS = {"message", "user", "access_token", "refresh_token"}
INVITATION_FIELDS = {
    "id", "email", "full_name", "is_admin", "invited_by", "created_at", "expires_at", "state", "accepted_at",
    "revoked_at",
}  # fmt: skip


def invite(client, headers, **body) -> dict:
    response = client.post("/api/invitations", json=ERIN | body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def token_in(message, page: str = "accept-invitation") -> str:
    """The token of the link in ``message``'s plain text, checked to be the same link as in its HTML."""
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    link = re.search(rf"http://localhost:4200/{page}\?token=([A-Za-z0-9_-]+)", text)
    assert link is not None, text
    assert f'href="{link.group(0)}"' in html
    return link.group(1)


def invited_token(client, mailbox, headers, **body) -> str:
    invite(client, headers, **body)
    (message,) = mailbox.deliver()
    return token_in(message)


def accept(client, token: str, **body):
    return client.post("/api/auth/accept-invitation", json=ACCEPT | {"token": token} | body)


def listed(client, headers, query: str = "") -> list[dict]:
    response = client.get(f"/api/invitations{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["invitations"]


def clock(monkeypatch, now: datetime) -> None:
    monkeypatch.setattr(invitations, "utcnow", lambda: now)


def headers_of(app, account: dict) -> dict:
    return {"Authorization": f"Bearer {token_for(app, account['id'])}"}


INVALID = {"error": invitations.INVALID_TOKEN, "details": {"token": ["Not a valid invitation token."]}}


def test_an_invitation_emails_a_link_that_creates_the_account_and_signs_in(client, app, mailbox, admin_headers):
    created = invite(client, admin_headers, full_name="Erin Ek")

    invitation = created["invitation"]
    assert created["message"] == "Invitation sent to erin@example.com."
    assert set(invitation) == INVITATION_FIELDS  # never the token
    assert (invitation["email"], invitation["is_admin"], invitation["state"]) == ("erin@example.com", False, "pending")
    assert invitation["invited_by"]["username"] == "root"
    created_at, expires_at = (datetime.fromisoformat(invitation[key]) for key in ("created_at", "expires_at"))
    assert expires_at - created_at == timedelta(days=7)
    (message,) = mailbox.deliver()
    assert message["To"] == "erin@example.com"
    assert message["Subject"] == "Rita Root invited you to FinStack's task manager"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    for part in (text, html):
        assert "Hello Erin Ek," in part and "Rita Root invited you to join FinStack" in part
        assert "valid for 7 days" in part and "administrator" not in part
    token = token_in(message)
    assert token not in str(created)

    response = accept(client, token, full_name="Erin Ek-Lund")

    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert set(body) == SESSION_FIELDS
    assert body["message"] == "Invitation accepted: welcome."
    assert (body["user"]["username"], body["user"]["email"], body["user"]["full_name"], body["user"]["is_admin"]) == (
        "erin", "erin@example.com", "Erin Ek-Lund", False,
    )  # fmt: skip
    me = client.get("/api/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.get_json()["user"]["id"] == body["user"]["id"]
    login = client.post("/api/auth/login", json={"username": "erin", "password": ACCEPT["password"]})
    assert login.status_code == 200
    with app.app_context():
        assert db.session.get(User, uuid.UUID(body["user"]["id"])).email_verified_at is not None
    (shown,) = listed(client, admin_headers)
    assert (shown["state"], shown["id"]) == ("accepted", invitation["id"])
    assert shown["accepted_at"] is not None


def test_an_administrators_invitation_says_so_and_makes_an_administrator(client, mailbox, admin_headers):
    invite(client, admin_headers, is_admin=True)
    (message,) = mailbox.deliver()

    for part in (message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()):
        assert "Hello," in part and "as an administrator" in " ".join(part.split())
    body = accept(client, token_in(message)).get_json()

    assert body["user"]["is_admin"] is True


@pytest.mark.app_config(FIRM_NAME="Adams & Brown", FRONTEND_URL="https://tasks.adams.example/app")
def test_the_invitation_names_the_firm_and_links_to_the_web_app(client, mailbox, admin_headers):
    invite(client, admin_headers)
    (message,) = mailbox.deliver()

    assert message["Subject"] == "Rita Root invited you to Adams & Brown's task manager"
    assert "https://tasks.adams.example/app/accept-invitation?token=" in message.get_body(("plain",)).get_content()
    assert "Adams &amp; Brown" in message.get_body(("html",)).get_content()


def test_the_name_given_by_the_administrator_is_the_default(client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers, full_name="Erin Ek")
    body = {key: value for key, value in ACCEPT.items() if key != "full_name"}

    response = client.post("/api/auth/accept-invitation", json=body | {"token": token})

    assert response.get_json()["user"]["full_name"] == "Erin Ek"


def test_without_a_name_from_anyone_accepting_is_a_400_and_the_token_stays_usable(client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)
    body = {key: value for key, value in ACCEPT.items() if key != "full_name"}

    refused = assert_error(client.post("/api/auth/accept-invitation", json=body | {"token": token}), 400, "full_name")

    assert refused["details"] == {"full_name": ["Missing data for required field."]}
    assert accept(client, token).status_code == 201


@pytest.mark.parametrize(
    "mode",
    [
        {"REGISTRATION": "open"},
        {"REGISTRATION": "invite"},
        {"REGISTRATION": "closed"},
        {"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": ("corp.example.org",)},
    ],
    ids=lambda mode: mode["REGISTRATION"],
)
def test_an_invitation_works_in_every_registration_mode(app, client, mailbox, admin_headers, mode):
    app.config.update(mode)
    token = invited_token(client, mailbox, admin_headers)  # erin@example.com: outside the domain mode's domain

    response = accept(client, token)

    assert response.status_code == 201, response.get_json()
    assert set(response.get_json()) == SESSION_FIELDS


def test_a_token_works_once(client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)
    assert accept(client, token).status_code == 201

    again = assert_error(accept(client, token, username="erin2"), 400)

    assert again == {"error": invitations.INVALID_TOKEN, "details": {"token": ["Not a valid invitation token."]}}


def test_an_invitation_expires_after_7_days(client, app, mailbox, admin_headers, monkeypatch):
    token = invited_token(client, mailbox, admin_headers)
    (shown,) = listed(client, admin_headers)
    expires_at = datetime.fromisoformat(shown["expires_at"])

    clock(monkeypatch, expires_at)
    assert assert_error(accept(client, token), 400)["error"] == invitations.INVALID_TOKEN
    assert listed(client, admin_headers)[0]["state"] == "expired"
    assert listed(client, admin_headers, "?state=pending") == []

    clock(monkeypatch, expires_at - timedelta(seconds=1))
    assert listed(client, admin_headers)[0]["state"] == "pending"
    assert accept(client, token).status_code == 201


@pytest.mark.parametrize("token", ["", "x" * 129])
def test_a_malformed_token_is_a_400_naming_it(client, token):
    assert_error(accept(client, token), 400, "token")


@pytest.mark.parametrize("missing", ["token", "username", "password"])
def test_accepting_needs_the_token_a_username_and_a_password(client, missing):
    body = {key: value for key, value in (ACCEPT | {"token": "t"}).items() if key != missing}

    assert_error(client.post("/api/auth/accept-invitation", json=body), 400, missing)


def test_unknown_used_revoked_replaced_and_expired_tokens_get_one_answer(client, mailbox, admin_headers, monkeypatch):
    used = invited_token(client, mailbox, admin_headers, email="used@example.com")
    assert accept(client, used, username="used").status_code == 201
    replaced = invited_token(client, mailbox, admin_headers, email="replaced@example.com")
    invite(client, admin_headers, email="replaced@example.com")
    mailbox.deliver()
    revoked = invited_token(client, mailbox, admin_headers, email="revoked@example.com")
    revoked_id = next(
        shown["id"]
        for shown in listed(client, admin_headers, "?state=pending")
        if shown["email"] == "revoked@example.com"
    )
    assert client.delete(f"/api/invitations/{revoked_id}", headers=admin_headers).status_code == 200
    expired = invited_token(client, mailbox, admin_headers, email="expired@example.com")

    answers = [accept(client, token) for token in (used, replaced, revoked, "no-such-token")]
    clock(monkeypatch, datetime.now(UTC) + timedelta(days=8))
    answers.append(accept(client, expired))

    assert {response.status_code for response in answers} == {400}
    assert len({response.get_data() for response in answers}) == 1


def test_a_taken_username_is_a_409_and_the_token_stays_usable(client, user, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)

    taken = assert_error(accept(client, token, username=user["username"].upper()), 409, "username")

    assert taken["details"] == {"username": ["This username is already taken."]}
    assert accept(client, token).status_code == 201


def test_a_password_like_the_address_is_a_400_and_the_token_stays_usable(client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)

    assert_error(accept(client, token, password="Erin@Example.com"), 400, "password")
    assert accept(client, token).status_code == 201


def test_an_address_that_got_an_account_meanwhile_is_a_409(client, mailbox, admin_headers, make_user):
    token = invited_token(client, mailbox, admin_headers)
    make_user("erin-elsewhere", email="erin@example.com")

    assert_error(accept(client, token), 409, "email")


@pytest.mark.parametrize("email", ["alice@example.com", "Alice@EXAMPLE.com"])
def test_inviting_an_address_that_has_an_account_is_a_409(client, app, user, admin_headers, email):
    body = assert_error(client.post("/api/invitations", json={"email": email}, headers=admin_headers), 409, "email")

    assert body["details"] == {"email": ["This email is already registered."]}
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(OutboxMessage)) == 0


def test_a_new_invitation_replaces_the_pending_one(client, mailbox, admin_headers):
    first = invited_token(client, mailbox, admin_headers, full_name="Erin")

    replacing = invite(client, admin_headers, email="ERIN@example.com", is_admin=True)
    (message,) = mailbox.deliver()

    assert replacing["message"] == (
        "Invitation sent to erin@example.com. It replaces the earlier one, whose link no longer works."
    )
    assert [shown["state"] for shown in listed(client, admin_headers)] == ["pending", "revoked"]
    assert_error(accept(client, first), 400)
    assert accept(client, token_in(message)).get_json()["user"]["is_admin"] is True


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": "not-an-address"},
        {"email": "erin@example.com", "is_admin": "yes"},
        {"email": "erin@example.com", "full_name": ""},
        {"email": "erin@example.com", "role": "admin"},
    ],
)
def test_a_bad_invitation_is_a_400(client, admin_headers, body):
    assert_error(client.post("/api/invitations", json=body, headers=admin_headers), 400)


def test_revoking_kills_the_link_and_says_so(client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)
    (shown,) = listed(client, admin_headers)

    response = client.delete(f"/api/invitations/{shown['id']}", headers=admin_headers)

    assert response.status_code == 200
    body = response.get_json()
    assert body["message"] == "Invitation revoked: its link no longer works."
    assert (body["invitation"]["state"], body["invitation"]["invited_by"]["username"]) == ("revoked", "root")
    assert_error(accept(client, token), 400)
    again = client.delete(f"/api/invitations/{shown['id']}", headers=admin_headers)
    assert (again.status_code, again.get_json()["invitation"]["revoked_at"]) == (200, body["invitation"]["revoked_at"])


def test_revoking_an_accepted_invitation_is_a_409_and_an_unknown_one_a_404(client, mailbox, admin_headers):
    accept(client, invited_token(client, mailbox, admin_headers))
    (shown,) = listed(client, admin_headers)

    assert_error(client.delete(f"/api/invitations/{shown['id']}", headers=admin_headers), 409)
    assert_error(client.delete(f"/api/invitations/{uuid.uuid4()}", headers=admin_headers), 404)
    assert_error(client.delete("/api/invitations/not-a-uuid", headers=admin_headers), 404)


def test_another_kind_of_token_is_no_invitation(client, app, user, admin_headers):
    with app.app_context():
        row, _raw = tokens.issue(
            "password_reset", user["email"], lifetime=timedelta(hours=1), now=datetime.now(UTC),
            user_id=uuid.UUID(user["id"]),
        )  # fmt: skip
        db.session.commit()
        row_id = row.id

    assert_error(client.delete(f"/api/invitations/{row_id}", headers=admin_headers), 404)
    assert listed(client, admin_headers) == []


def test_the_list_is_newest_first_and_filters_by_state(client, mailbox, admin_headers, monkeypatch):
    start = datetime.now(UTC) - timedelta(hours=1)  # in the past, so that the emails are due now
    for minutes, email in enumerate(["a@example.com", "b@example.com", "c@example.com", "d@example.com"]):
        clock(monkeypatch, start + timedelta(minutes=minutes))
        invite(client, admin_headers, email=email)
    links = [token_in(message) for message in mailbox.deliver()]
    ids = {shown["email"]: shown["id"] for shown in listed(client, admin_headers)}
    assert accept(client, links[0], username="anna").status_code == 201  # a@
    client.delete(f"/api/invitations/{ids['b@example.com']}", headers=admin_headers)
    clock(monkeypatch, start + timedelta(days=7, minutes=2, seconds=30))  # c@ has expired, d@ has not

    def emails(query: str = "") -> list[str]:
        return [shown["email"] for shown in listed(client, admin_headers, query)]

    assert emails() == ["d@example.com", "c@example.com", "b@example.com", "a@example.com"]
    assert emails("?state=pending") == ["d@example.com"]
    assert emails("?state=expired") == ["c@example.com"]
    assert emails("?state=revoked") == ["b@example.com"]
    assert emails("?state=accepted") == ["a@example.com"]
    assert emails("?limit=2") == ["d@example.com", "c@example.com"]


@pytest.mark.parametrize("query", ["?state=sent", "?limit=0", "?limit=201", "?limit=x", "?state=pending&state=expired"])
def test_a_bad_list_query_is_a_400(client, admin_headers, query):
    assert_error(client.get(f"/api/invitations{query}", headers=admin_headers), 400)


def test_an_inviter_deleted_since_shows_as_null(client, app, make_user, mailbox):
    other_admin = make_user("ops", full_name="Otto Ops", is_admin=True)
    invite(client, {"Authorization": f"Bearer {token_for(app, other_admin['id'])}"})
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(other_admin["id"])))
        db.session.commit()
    root = make_user("root", full_name="Rita Root", is_admin=True)

    (shown,) = listed(client, {"Authorization": f"Bearer {token_for(app, root['id'])}"})

    assert shown["invited_by"] is None


@pytest.mark.parametrize("change", [{"is_active": False}, {"is_admin": False}], ids=["deactivated", "demoted"])
def test_an_administrator_who_steps_down_takes_back_their_pending_invitations(
    client, app, make_user, mailbox, admin_headers, change
):
    ops = make_user("ops", full_name="Otto Ops", is_admin=True)
    pending = invited_token(client, mailbox, headers_of(app, ops), is_admin=True)
    accepted = invited_token(client, mailbox, headers_of(app, ops), email="anna@example.com")
    assert accept(client, accepted, username="anna").status_code == 201
    invite(client, admin_headers, email="carl@example.com")

    response = client.patch(f"/api/users/{ops['id']}", json=change, headers=admin_headers)

    assert response.status_code == 200
    assert response.get_json()["message"] == (
        "User updated. The 1 pending invitation(s) they sent were revoked: their links no longer work."
    )
    states = {shown["email"]: shown["state"] for shown in listed(client, admin_headers)}
    assert states == {"erin@example.com": "revoked", "anna@example.com": "accepted", "carl@example.com": "pending"}
    assert assert_error(accept(client, pending), 400) == INVALID
    back = client.patch(f"/api/users/{ops['id']}", json=dict.fromkeys(change, True), headers=admin_headers)
    assert back.get_json()["message"] == "User updated."
    assert assert_error(accept(client, pending), 400) == INVALID  # an administrator again: still revoked
    with app.app_context():
        assert db.session.scalar(sa.select(User).where(User.email == "erin@example.com")) is None


@pytest.mark.parametrize("change", ["demoted", "deactivated", "deleted"])
def test_an_invitation_whose_inviter_is_no_active_administrator_now_is_refused_and_revoked(
    client, app, make_user, mailbox, admin_headers, change
):
    """However that came about: in the database, by a command, or before demotions revoked invitations."""
    ops = make_user("ops", full_name="Otto Ops", is_admin=True)
    token = invited_token(client, mailbox, headers_of(app, ops), is_admin=True)
    with app.app_context():
        account = db.session.get(User, uuid.UUID(ops["id"]))
        if change == "deleted":
            db.session.delete(account)
        else:
            setattr(account, {"demoted": "is_admin", "deactivated": "is_active"}[change], False)
        db.session.commit()

    refused = assert_error(accept(client, token), 400)

    assert refused == INVALID
    (shown,) = listed(client, admin_headers)
    assert (shown["state"], shown["accepted_at"]) == ("revoked", None)
    assert assert_error(accept(client, token), 400) == INVALID
    with app.app_context():
        assert db.session.scalar(sa.select(User).where(User.email == "erin@example.com")) is None


def test_invitations_are_for_administrators(client, auth_headers):
    for method, path in (("post", "/api/invitations"), ("get", "/api/invitations"),
                         ("delete", f"/api/invitations/{uuid.uuid4()}")):  # fmt: skip
        body = assert_error(getattr(client, method)(path, json=ERIN, headers=auth_headers), 403)
        assert body["error"] == "Only an administrator can do this."
        assert_error(getattr(client, method)(path, json=ERIN), 401)


def test_a_cors_preflight_of_the_invitations_needs_no_token(client):
    response = client.options(
        "/api/invitations",
        headers={"Origin": "http://localhost:4200", "Access-Control-Request-Method": "POST"},
    )

    assert response.status_code == 200


@pytest.mark.app_config(RATELIMIT_REGISTER="2 per minute")
def test_accepting_is_rate_limited_per_client_like_registration(client):
    answers = [accept(client, f"guess-{n}").status_code for n in range(3)]

    assert answers == [400, 400, 429]


@pytest.mark.own_database  # two requests on two connections, with real commits
def test_of_two_accepts_of_one_token_at_once_one_makes_the_account(app, client, mailbox, admin_headers):
    token = invited_token(client, mailbox, admin_headers)
    results = {}

    def accept_as(username: str) -> None:
        results[username] = accept(app.test_client(), token, username=username)

    racers = [threading.Thread(target=accept_as, args=(name,)) for name in ("erin", "erin-too")]
    with app.app_context(), lock_waits() as wait_for:
        # Hold the invitation's row (SQLite: the write lock), so that both requests come to wait for it, then let them
        # go. PostgreSQL: both have read the token as usable, and consume()'s conditional UPDATE lets one through.
        # SQLite: each request's transaction waits for the write lock as it begins, so the second reads the token
        # only once the first has committed its use, and the two never overlap.
        db.session.execute(sa.select(OneTimeToken).where(OneTimeToken.purpose == "invitation").with_for_update())
        for racer in racers:
            racer.start()
        wait_for(*racers)
        db.session.rollback()
    for racer in racers:
        racer.join(10)

    assert sorted(response.status_code for response in results.values()) == [201, 400]
    assert [response.get_json() for response in results.values() if response.status_code == 400] == [INVALID]
    with app.app_context():
        assert db.session.scalars(sa.select(User.username).where(User.email == "erin@example.com")).all() in (
            ["erin"], ["erin-too"],
        )  # fmt: skip


@pytest.mark.own_database  # two requests on two connections, with real commits
@pytest.mark.parametrize("first", ["demotion", "acceptance"])
def test_an_accept_and_the_inviters_demotion_at_once_end_one_way_or_the_other(app, admin, make_user, mailbox, first):
    """Either the acceptance comes first (the account is made, and the demotion leaves the used invitation alone), or
    the demotion does (it revokes the invitation, and the acceptance is refused): never an account from an invitation
    the demotion took back, and neither deadlocks."""
    ops = make_user("ops", full_name="Otto Ops", is_admin=True)
    token = invited_token(app.test_client(), mailbox, headers_of(app, ops), is_admin=True)
    root = headers_of(app, admin)
    send = {
        "demotion": lambda client: client.patch(f"/api/users/{ops['id']}", json={"is_admin": False}, headers=root),
        "acceptance": lambda client: accept(client, token),
    }
    order = {name: send[name] for name in (first, *(name for name in send if name != first))}
    # Hold the invitation's row (SQLite: the write lock), and let the two requests queue for it in this order.
    invitation_row = sa.select(OneTimeToken).where(OneTimeToken.purpose == "invitation").with_for_update()
    results = queued_for_a_lock(app, lambda: db.session.execute(invitation_row), order)

    assert results["demotion"].status_code == 200, results["demotion"].get_json()
    with app.app_context():
        invitation = db.session.scalar(sa.select(OneTimeToken).where(OneTimeToken.purpose == "invitation"))
        erin = db.session.scalar(sa.select(User).where(User.email == "erin@example.com"))
    if results["acceptance"].status_code == 201:
        assert (invitation.used_at is not None, invitation.revoked_at, erin.is_admin) == (True, None, True)
        assert results["demotion"].get_json()["message"] == "User updated."  # nothing left to revoke
    else:
        assert results["acceptance"].get_json() == INVALID
        assert (invitation.used_at, invitation.revoked_at is not None, erin) == (None, True, None)
    if POSTGRES_URL:  # a row's lock goes to its waiters in the order they came; SQLite's waiters retry, in any order
        assert results["acceptance"].status_code == {"acceptance": 201, "demotion": 400}[first]


@pytest.mark.own_database  # two requests on two connections, with real commits
def test_two_invitations_to_one_address_at_once_leave_one_pending(app, admin, mailbox):
    headers = {"Authorization": f"Bearer {token_for(app, admin['id'])}"}
    results = []

    def send() -> None:
        results.append(app.test_client().post("/api/invitations", json=ERIN, headers=headers).status_code)

    senders = [threading.Thread(target=send) for _ in range(2)]
    with app.app_context(), lock_waits() as wait_for:
        if POSTGRES_URL:  # the advisory lock the view takes for this address, held here first
            key = sa.text("SELECT pg_advisory_xact_lock(:key)")
            db.session.execute(key, {"key": advisory_key("erin@example.com")})
        else:
            db.session.connection()  # SQLite's write lock, taken as the transaction begins
        for sender in senders:
            sender.start()
        wait_for(*senders)
        db.session.rollback()
    for sender in senders:
        sender.join(10)

    assert results == [201, 201]
    with app.app_context():
        states = db.session.execute(
            sa.select(OneTimeToken.used_at, OneTimeToken.revoked_at).where(OneTimeToken.purpose == "invitation")
        ).all()
    assert sorted(revoked is None for _used, revoked in states) == [False, True]


def advisory_key(email: str) -> int:
    return int.from_bytes(hashlib.sha256(f"invitation:{email}".encode()).digest()[:8], "big", signed=True)
