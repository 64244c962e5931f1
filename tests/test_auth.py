import base64
import json
import uuid
from datetime import timedelta

import jwt as pyjwt
import pytest

import models
import routes.auth
from helpers import PUBLIC_USER_FIELDS, assert_error, token_for
from models import User, db

NEW_USER = {
    "username": "carol",
    "email": "carol@example.com",
    "password": "s3cret-passphrase",
    "full_name": "Carol Clark",
}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_register_creates_user_and_returns_working_token(client):
    response = client.post("/api/auth/register", json=NEW_USER)

    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"message", "user", "access_token", "refresh_token"}
    assert set(body["user"]) == PUBLIC_USER_FIELDS
    assert body["user"]["username"] == "carol"
    assert body["user"]["is_active"] is True
    assert body["user"]["created_at"].endswith("+00:00")
    me = client.get("/api/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.get_json() == {"user": body["user"]}


def test_register_stores_a_werkzeug_hash_not_the_password(app, client):
    client.post("/api/auth/register", json=NEW_USER)

    with app.app_context():
        stored = db.session.scalar(db.select(User.password_hash).where(User.username == "carol"))
    assert stored.startswith("scrypt:")
    assert NEW_USER["password"] not in stored


def test_register_normalises_username_and_email_case(client):
    response = client.post("/api/auth/register", json=NEW_USER | {"username": "  Carol ", "email": "Carol@Example.COM"})

    assert response.status_code == 201
    assert response.get_json()["user"]["username"] == "carol"
    assert response.get_json()["user"]["email"] == "carol@example.com"
    login = client.post("/api/auth/login", json={"username": "CAROL", "password": NEW_USER["password"]})
    assert login.status_code == 200


@pytest.mark.parametrize("field", ["username", "email", "password", "full_name"])
def test_register_requires_each_field(client, field):
    body = {key: value for key, value in NEW_USER.items() if key != field}

    assert_error(client.post("/api/auth/register", json=body), 400, field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("username", "ab"),
        ("username", "has space"),
        ("username", "x" * 81),
        ("username", 42),
        ("email", "not-an-email"),
        ("email", None),
        ("password", "short"),
        ("password", "x" * 129),
        ("full_name", "   "),
        ("full_name", "nul\x00byte"),
        ("full_name", "lone \ud800 surrogate"),
        ("full_name", "Carol\nBcc: everyone@example.com"),  # one line: a name goes into email subjects
        ("full_name", "Carol\tClark"),
        ("full_name", "Carol\x85Clark"),
        ("password", "surrogate\udc80pass"),
        ("email", "İ" * 200 + "@example.com"),  # 212 characters, 412 once lower-cased
    ],
)
def test_register_rejects_invalid_values(client, field, value):
    assert_error(client.post("/api/auth/register", json=NEW_USER | {field: value}), 400, field)


def test_register_rejects_unknown_fields(app, client):
    assert_error(client.post("/api/auth/register", json=NEW_USER | {"is_admin": True}), 400, "is_admin")

    with app.app_context():
        assert db.session.scalar(db.select(User).where(User.username == "carol")) is None


def test_register_duplicate_username_is_409(client, user):
    body = assert_error(client.post("/api/auth/register", json=NEW_USER | {"username": user["username"].upper()}), 409)

    assert set(body["details"]) == {"username"}


def test_register_duplicate_email_is_409(client, user):
    body = assert_error(client.post("/api/auth/register", json=NEW_USER | {"email": user["email"].upper()}), 409)

    assert set(body["details"]) == {"email"}


def test_login_returns_user_and_token(client, user):
    response = client.post("/api/auth/login", json={"username": "alice", "password": user["password"]})

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"message", "user", "access_token", "refresh_token"}
    assert body["user"]["id"] == user["id"]
    assert set(body["user"]) == PUBLIC_USER_FIELDS


def test_access_token_identity_is_user_id_string_valid_24_hours(app, client, user):
    token = client.post("/api/auth/login", json={"username": "alice", "password": user["password"]}).get_json()[
        "access_token"
    ]

    claims = pyjwt.decode(token, app.config["JWT_SECRET_KEY"], algorithms=["HS256"])
    assert claims["sub"] == user["id"]
    assert claims["exp"] - claims["iat"] == 24 * 3600


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "alice", "password": "wrong-password"},
        {"username": "nobody", "password": "correct-horse-battery"},
    ],
)
def test_login_with_wrong_credentials_is_401_with_one_message(client, user, credentials):
    body = assert_error(client.post("/api/auth/login", json=credentials), 401)

    assert body["error"] == "Invalid username or password."


def test_login_of_deactivated_user_is_401(client, make_user):
    inactive = make_user("dave", is_active=False)

    assert_error(client.post("/api/auth/login", json={"username": "dave", "password": inactive["password"]}), 401)


@pytest.mark.parametrize(
    "credentials",
    [{"username": "alice", "password": "\ud800"}, {"username": "\udc80", "password": "whatever-it-is"}],
)
def test_login_with_lone_surrogates_is_400(client, user, credentials):
    assert_error(client.post("/api/auth/login", json=credentials), 400)


@pytest.mark.parametrize(
    ("username", "password", "active"),
    [("alice", "correct-horse-battery", True), ("alice", "wrong-password", True), ("nobody", "any-password", True),
     ("dave", "correct-horse-battery", False)],
    ids=["right password", "wrong password", "unknown user", "deactivated user"],
)  # fmt: skip
def test_login_checks_one_password_hash_whoever_asks(client, make_user, monkeypatch, username, password, active):
    make_user("alice")
    make_user("dave", is_active=False)
    checks = []

    def counting(original):
        return lambda *args: checks.append(1) or original(*args)

    monkeypatch.setattr("models.check_password_hash", counting(models.check_password_hash))
    monkeypatch.setattr("routes.auth.check_password_hash", counting(routes.auth.check_password_hash))

    client.post("/api/auth/login", json={"username": username, "password": password})

    assert len(checks) == 1


@pytest.mark.parametrize("field", ["username", "password"])
def test_login_requires_each_field(client, field):
    body = {"username": "alice", "password": "whatever-it-is"}
    del body[field]

    assert_error(client.post("/api/auth/login", json=body), 400, field)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(app, client, user, scheme):
    response = client.get("/api/auth/me", headers={"Authorization": f"{scheme} {token_for(app, user['id'])}"})

    assert response.status_code == 200


def test_me_returns_current_user(client, user, auth_headers):
    response = client.get("/api/auth/me", headers=auth_headers)

    assert response.status_code == 200
    assert response.get_json()["user"]["id"] == user["id"]
    assert set(response.get_json()["user"]) == PUBLIC_USER_FIELDS


def forge(claims: dict, header: dict, key: bytes = b"") -> str:
    """A token assembled by hand, for attacks PyJWT itself refuses to produce."""

    def encode(part) -> str:
        raw = part if isinstance(part, bytes) else json.dumps(part).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{encode(header)}.{encode(claims)}.{encode(key)}"


def bad_tokens(app, user_id: str) -> dict:
    good = token_for(app, user_id)
    header, _, signature = good.split(".")
    claims = pyjwt.decode(good, options={"verify_signature": False})
    tampered_claims = base64.urlsafe_b64encode(json.dumps(claims | {"sub": str(uuid.uuid4())}).encode())
    return {
        "malformed": "not-a-jwt",
        "garbage segments": "abc.def.ghi",
        "expired": token_for(app, user_id, expires_delta=timedelta(seconds=-1)),
        "tampered payload": f"{header}.{tampered_claims.rstrip(b'=').decode()}.{signature}",
        "alg none": forge(claims, {"alg": "none", "typ": "JWT"}),
        "other key": pyjwt.encode(claims, "another-secret-that-is-long-enough-0123456789", algorithm="HS256"),
        "not a uuid subject": pyjwt.encode(claims | {"sub": "admin"}, app.config["JWT_SECRET_KEY"], algorithm="HS256"),
    }


@pytest.mark.parametrize(
    "kind",
    ["malformed", "garbage segments", "expired", "tampered payload", "alg none", "other key", "not a uuid subject"],
)
def test_bad_tokens_are_401_with_the_error_envelope(app, client, user, kind):
    token = bad_tokens(app, user["id"])[kind]

    body = assert_error(client.get("/api/auth/me", headers=bearer(token)), 401)

    assert "msg" not in body


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Token abc"}, {"Authorization": "Bearer"}, {"Authorization": ""}],
    ids=["missing", "wrong scheme", "empty bearer", "empty header"],
)
def test_missing_or_malformed_authorization_header_is_401(client, headers):
    response = client.get("/api/auth/me", headers=headers)

    assert_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_of_deactivated_user_is_rejected_on_next_request(app, client, user, auth_headers):
    assert client.get("/api/auth/me", headers=auth_headers).status_code == 200
    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).is_active = False
        db.session.commit()

    assert_error(client.get("/api/auth/me", headers=auth_headers), 401)
    assert_error(client.get("/api/tasks", headers=auth_headers), 401)


def test_token_of_deleted_user_is_rejected(app, client, user, auth_headers):
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(user["id"])))
        db.session.commit()

    assert_error(client.get("/api/auth/me", headers=auth_headers), 401)


@pytest.mark.parametrize("password", ["carolclark", "CarolClark ", "carol.clark@example.com", "Carol.Clark"])
def test_register_refuses_the_username_or_email_as_password(client, password):
    account = NEW_USER | {"username": "carolclark", "email": "carol.clark@example.com", "password": password}

    body = assert_error(client.post("/api/auth/register", json=account), 400, "password")

    assert body["details"]["password"] == ["Must not be your username or email address."]
    assert client.post("/api/auth/register", json=account | {"password": "another-passphrase"}).status_code == 201
