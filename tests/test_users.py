import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

import tokens
from helpers import PASSWORD, PUBLIC_USER_FIELDS, assert_error, tokens_for
from models import OneTimeToken, db


def test_list_users_returns_active_users_by_name(client, auth_headers, make_user, user):
    make_user("zed", full_name="Zed Zimmer")
    make_user("bea", full_name="Bea Baker")
    make_user("bo", full_name="bo lowercase")
    make_user("old", full_name="Old Timer", is_active=False)

    response = client.get("/api/users", headers=auth_headers)

    assert response.status_code == 200
    users = response.get_json()["users"]
    assert [u["full_name"] for u in users] == ["Alice Adams", "Bea Baker", "bo lowercase", "Zed Zimmer"]
    assert all(set(u) == PUBLIC_USER_FIELDS for u in users)
    assert all(u["is_active"] is True for u in users)


def test_list_users_requires_a_token(client, user):
    assert_error(client.get("/api/users"), 401)


def users_listed(client, headers, query="") -> list[str]:
    response = client.get(f"/api/users{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [listed["username"] for listed in response.get_json()["users"]]


def test_me_returns_the_profile_with_phone_and_role(client, user, auth_headers):
    response = client.get("/api/users/me", headers=auth_headers)

    assert response.status_code == 200
    body = response.get_json()["user"]
    assert set(body) == PUBLIC_USER_FIELDS
    assert (body["username"], body["phone"], body["is_admin"]) == ("alice", None, False)
    assert response.headers["Cache-Control"] == "no-store"


def test_patch_me_changes_name_and_phone_and_takes_the_email_back_unchanged(client, user, auth_headers):
    change = {"full_name": " Alice Ashdown ", "email": "Alice@Example.com", "phone": "+44 20 7946 0958"}

    response = client.patch("/api/users/me", json=change, headers=auth_headers)

    assert response.status_code == 200
    body = response.get_json()["user"]
    assert (body["full_name"], body["email"], body["phone"]) == ("Alice Ashdown", "alice@example.com", change["phone"])
    assert client.get("/api/users/me", headers=auth_headers).get_json()["user"] == body


@pytest.mark.app_config(DEFAULT_TIME_ZONE="America/New_York")
def test_a_user_has_the_firms_time_zone_until_choosing_one(client, user, auth_headers):
    def time_zone(response) -> str:
        assert response.status_code == 200, response.get_json()
        return response.get_json()["user"]["time_zone"]

    assert time_zone(client.get("/api/users/me", headers=auth_headers)) == "America/New_York"
    assert time_zone(client.patch("/api/users/me", json={"time_zone": "Asia/Tokyo"}, headers=auth_headers)) == (
        "Asia/Tokyo"
    )
    assert time_zone(client.get("/api/auth/me", headers=auth_headers)) == "Asia/Tokyo"
    listed = client.get("/api/users", headers=auth_headers).get_json()["users"]
    assert [person["time_zone"] for person in listed] == ["Asia/Tokyo"]
    assert time_zone(client.patch("/api/users/me", json={"time_zone": None}, headers=auth_headers)) == (
        "America/New_York"
    )


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "europe/london", "", "+02:00", 2, "Europe/London\n", "localtime"]
)
def test_a_time_zone_must_be_an_iana_name(client, user, auth_headers, zone):
    assert_error(client.patch("/api/users/me", json={"time_zone": zone}, headers=auth_headers), 400, "time_zone")
    assert client.get("/api/users/me", headers=auth_headers).get_json()["user"]["time_zone"] == "UTC"


@pytest.mark.parametrize("cleared", [None, ""])
def test_patch_me_clears_the_phone_with_null_or_empty(client, user, auth_headers, cleared):
    client.patch("/api/users/me", json={"phone": "020 7946 0958"}, headers=auth_headers)

    response = client.patch("/api/users/me", json={"phone": cleared}, headers=auth_headers)

    assert response.get_json()["user"]["phone"] is None


@pytest.mark.parametrize("email", ["alice.ashdown@example.com", "BOB@example.com"])
def test_patch_me_to_another_email_is_400_pointing_at_the_email_change_and_changes_nothing(
    client, user, other_user, auth_headers, email
):
    response = client.patch("/api/users/me", json={"full_name": "New Name", "email": email}, headers=auth_headers)

    body = assert_error(response, 400, "email")
    assert "POST /api/auth/me/email" in body["error"]
    me = client.get("/api/users/me", headers=auth_headers).get_json()["user"]
    assert (me["full_name"], me["email"]) == ("Alice Adams", "alice@example.com")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"phone": "call me"}, "phone"),
        ({"phone": "+" + "1" * 40}, "phone"),
        ({"email": "not-an-email"}, "email"),
        ({"full_name": "  "}, "full_name"),
        ({"is_admin": True}, "is_admin"),
        ({"username": "mallory"}, "username"),
        ({"password": "new-password-1"}, "password"),
    ],
)
def test_patch_me_rejects_bad_or_forbidden_fields_and_changes_nothing(client, user, auth_headers, change, field):
    assert_error(client.patch("/api/users/me", json=change, headers=auth_headers), 400, field)

    me = client.get("/api/users/me", headers=auth_headers).get_json()["user"]
    assert (me["username"], me["is_admin"], me["phone"]) == ("alice", False, None)


def test_patch_me_with_nothing_to_change_is_400(client, user, auth_headers):
    assert_error(client.patch("/api/users/me", json={}, headers=auth_headers), 400)


def test_admins_can_list_inactive_users_too(client, admin, admin_headers, make_user):
    make_user("old", full_name="Old Timer", is_active=False)

    assert users_listed(client, admin_headers, "?include_inactive=true") == ["old", "root"]
    assert users_listed(client, admin_headers, "?include_inactive=false") == ["root"]


def test_only_admins_may_list_inactive_users(client, user, auth_headers):
    assert_error(client.get("/api/users?include_inactive=true", headers=auth_headers), 403)


def test_users_list_rejects_unknown_or_bad_parameters(client, user, auth_headers):
    assert_error(client.get("/api/users?include_inactive=maybe", headers=auth_headers), 400, "include_inactive")
    assert_error(client.get("/api/users?active=1", headers=auth_headers), 400, "active")


def admin_patch(client, headers, user_id, **change):
    return client.patch(f"/api/users/{user_id}", json=change, headers=headers)


def test_deactivation_locks_the_user_out_at_the_next_request(app, client, admin_headers, user, auth_headers):
    tokens = tokens_for(app, user["id"])
    assert client.get("/api/tasks", headers=auth_headers).status_code == 200

    response = admin_patch(client, admin_headers, user["id"], is_active=False)

    assert response.status_code == 200
    assert response.get_json()["user"]["is_active"] is False
    assert_error(client.get("/api/tasks", headers=auth_headers), 401)
    assert_error(client.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}), 401)
    assert "alice" not in users_listed(client, admin_headers)
    login = client.post("/api/auth/login", json={"username": "alice", "password": PASSWORD})
    assert_error(login, 401)


def test_reactivation_does_not_revive_old_tokens(client, admin_headers, user, auth_headers):
    admin_patch(client, admin_headers, user["id"], is_active=False)

    assert admin_patch(client, admin_headers, user["id"], is_active=True).status_code == 200

    assert_error(client.get("/api/tasks", headers=auth_headers), 401)
    assert client.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 200


LINK = re.compile(r"http://localhost:4200/(reset-password|confirm-email-change)\?token=([A-Za-z0-9_-]+)")


def emailed_links(mailbox) -> dict[tuple[str, str], str]:
    """The tokens of the links in the email sent now, by recipient and page."""
    return {
        (message["To"], link.group(1)): link.group(2)
        for message in mailbox.deliver()
        for link in LINK.finditer(message.get_body(("plain",)).get_content())
    }


def test_deactivation_revokes_the_links_emailed_to_the_account(app, client, admin_headers, user, other_user, mailbox):
    headers = {"Authorization": f"Bearer {tokens_for(app, user['id'])['access_token']}"}
    for email in (user["email"], other_user["email"]):
        assert client.post("/api/auth/forgot-password", json={"email": email}).status_code == 202
    moving = {"email": "alice@example.org", "password": PASSWORD}
    assert client.post("/api/auth/me/email", json=moving, headers=headers).status_code == 202
    links = emailed_links(mailbox)
    with app.app_context():
        tokens.issue(
            "email_verification", user["email"], lifetime=timedelta(hours=48), now=datetime.now(UTC),
            user_id=uuid.UUID(user["id"]),
        )  # fmt: skip
        db.session.commit()

    admin_patch(client, admin_headers, user["id"], is_active=False)
    assert admin_patch(client, admin_headers, user["id"], is_active=True).status_code == 200

    def reset(email: str):
        token = links[(email, "reset-password")]
        return client.post("/api/auth/reset-password", json={"token": token, "password": "a-new-long-passphrase"})

    assert_error(reset(user["email"]), 400, "token")
    confirm = client.post(
        "/api/auth/confirm-email-change", json={"token": links[("alice@example.org", "confirm-email-change")]}
    )
    assert_error(confirm, 400, "token")
    with app.app_context():
        alices = db.session.scalars(sa.select(OneTimeToken).where(OneTimeToken.user_id == uuid.UUID(user["id"])))
        assert sorted((link.purpose, link.revoked_at is not None) for link in alices) == [
            ("email_change", True), ("email_verification", True), ("password_reset", True),
        ]  # fmt: skip
    assert client.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 200
    assert reset(other_user["email"]).status_code == 200  # someone else's link works still


def test_granting_admin_takes_effect_at_once(client, admin_headers, user, auth_headers):
    assert_error(client.get("/api/users?include_inactive=true", headers=auth_headers), 403)

    assert admin_patch(client, admin_headers, user["id"], is_admin=True).get_json()["user"]["is_admin"] is True

    assert client.get("/api/users?include_inactive=true", headers=auth_headers).status_code == 200


def test_only_admins_may_change_accounts(client, user, other_user, auth_headers):
    assert_error(admin_patch(client, auth_headers, other_user["id"], is_active=False), 403)
    assert_error(admin_patch(client, auth_headers, user["id"], is_admin=True), 403)

    assert "bob" in users_listed(client, auth_headers)
    assert client.get("/api/users/me", headers=auth_headers).get_json()["user"]["is_admin"] is False


@pytest.mark.parametrize("change", [{"is_admin": False}, {"is_active": False}, {"is_admin": False, "is_active": False}])
def test_the_last_active_admin_cannot_be_demoted_or_deactivated(client, admin, admin_headers, make_user, change):
    make_user("former", is_admin=True, is_active=False)  # an inactive admin does not count

    body = assert_error(admin_patch(client, admin_headers, admin["id"], **change), 409)
    assert "last active administrator" in body["error"]
    assert set(body["details"]) == set(change)

    me = client.get("/api/users/me", headers=admin_headers).get_json()["user"]
    assert (me["is_admin"], me["is_active"]) == (True, True)


def test_an_admin_may_step_down_while_another_remains(client, admin, admin_headers, user):
    admin_patch(client, admin_headers, user["id"], is_admin=True)

    assert admin_patch(client, admin_headers, admin["id"], is_admin=False).status_code == 200

    assert_error(admin_patch(client, admin_headers, user["id"], is_admin=False), 403)  # no longer an admin


@pytest.mark.parametrize(
    ("change", "field"),
    [({"is_active": "no"}, "is_active"), ({"is_admin": 1}, "is_admin"), ({"email": "x@y.z"}, "email")],
)
def test_account_changes_must_be_json_booleans(client, admin_headers, user, change, field):
    assert_error(admin_patch(client, admin_headers, user["id"], **change), 400, field)


def test_account_change_of_an_unknown_user_is_404(client, admin_headers):
    assert_error(admin_patch(client, admin_headers, uuid.uuid4(), is_active=False), 404)
    assert_error(admin_patch(client, admin_headers, "not-a-uuid", is_active=False), 404)


NEW_ACCOUNT = {
    "username": "Dave",
    "email": "Dave@Example.com",
    "password": "dave-passphrase",
    "full_name": " Dave Dunn ",
}


def log_in(client, username: str, password: str):
    return client.post("/api/auth/login", json={"username": username, "password": password})


def test_an_admin_creates_an_account_that_can_sign_in(client, admin_headers):
    response = client.post("/api/users", json=NEW_ACCOUNT, headers=admin_headers)

    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"message", "user"}  # no tokens: nobody is signed in by it
    assert set(body["user"]) == PUBLIC_USER_FIELDS
    assert (body["user"]["username"], body["user"]["email"], body["user"]["full_name"]) == (
        "dave",
        "dave@example.com",
        "Dave Dunn",
    )
    assert (body["user"]["is_admin"], body["user"]["is_active"]) == (False, True)
    assert response.headers["Cache-Control"] == "no-store"
    login = log_in(client, "dave", "dave-passphrase")
    assert login.status_code == 200
    assert login.get_json()["user"] == body["user"]


def test_an_admin_creates_another_admin(client, admin_headers):
    response = client.post("/api/users", json=NEW_ACCOUNT | {"is_admin": True}, headers=admin_headers)

    assert response.status_code == 201
    assert response.get_json()["user"]["is_admin"] is True
    token = log_in(client, "dave", "dave-passphrase").get_json()["access_token"]
    listed = client.get("/api/users?include_inactive=true", headers={"Authorization": f"Bearer {token}"})
    assert listed.status_code == 200  # administrators only


def test_only_an_admin_creates_accounts(client, auth_headers):
    assert_error(client.post("/api/users", json=NEW_ACCOUNT, headers=auth_headers), 403)
    assert_error(client.post("/api/users", json=NEW_ACCOUNT), 401)

    assert log_in(client, "dave", "dave-passphrase").status_code == 401


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"username": "x"}, "username"),
        ({"email": "not-an-email"}, "email"),
        ({"password": "short"}, "password"),
        ({"password": "dave@example.com"}, "password"),  # the same rules as a registration
        ({"full_name": ""}, "full_name"),
        ({"is_admin": "yes"}, "is_admin"),
        ({"role": "admin"}, "role"),
    ],
)
def test_creating_an_account_validates_like_registration(client, admin_headers, change, field):
    assert_error(client.post("/api/users", json=NEW_ACCOUNT | change, headers=admin_headers), 400, field)


def test_creating_a_taken_username_or_email_is_a_409(client, admin_headers, user):
    taken = NEW_ACCOUNT | {"username": "ALICE", "email": "alice@example.com"}

    body = assert_error(client.post("/api/users", json=taken, headers=admin_headers), 409, "username", "email")

    assert body["details"] == {
        "username": ["This username is already taken."],
        "email": ["This email is already registered."],
    }
