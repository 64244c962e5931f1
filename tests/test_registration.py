"""Who may join: REGISTRATION open, domain (ALLOWED_EMAIL_DOMAINS, with the address verified), invite or closed,
administrators creating and inviting accounts in every mode, and production's defaults, served for real."""

import secrets
import subprocess
import sys

import pytest
import sqlalchemy as sa

import tokens
from config import DEFAULT_PASSWORD_HASH_METHOD, normalise_database_url, parse_domains
from helpers import GUNICORN, PRODUCTION, ROOT, assert_error, call
from models import OneTimeToken, User, db

ACCOUNT = {"username": "erin", "email": "erin@example.com", "password": "erin-passphrase", "full_name": "Erin Ek"}
DOMAINS = {"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": ("example.com", "corp.example.org")}


def usernames(app) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(User.username).order_by(User.username)))


def test_development_registration_is_open(client, app):
    assert app.config["REGISTRATION"] == "open"
    assert client.post("/api/auth/register", json=ACCOUNT).status_code == 201


@pytest.mark.app_config(REGISTRATION="closed")
def test_closed_registration_is_a_403_that_says_whom_to_ask(client, app):
    body = assert_error(client.post("/api/auth/register", json=ACCOUNT), 403)

    assert body == {"error": "Registration is closed: ask an administrator to create your account.", "details": {}}
    assert_error(client.post("/api/auth/register", json={"username": ""}), 403)  # closed, whatever the body
    assert usernames(app) == []


@pytest.mark.app_config(REGISTRATION="invite")
def test_invite_only_registration_is_a_403_that_says_to_ask_for_an_invitation(client, app):
    body = assert_error(client.post("/api/auth/register", json=ACCOUNT), 403)

    assert body == {
        "error": "Registration is by invitation only: ask an administrator to invite you, then follow the link in the "
        "invitation's email.",
        "details": {},
    }
    assert_error(client.post("/api/auth/register", json={"username": ""}), 403)  # whatever the body
    assert usernames(app) == []


@pytest.mark.app_config(REGISTRATION="invite")
def test_an_admin_creates_accounts_while_registration_is_by_invitation(client, admin_headers):
    assert client.post("/api/users", json=ACCOUNT, headers=admin_headers).status_code == 201


@pytest.mark.app_config(REGISTRATION="closed")
def test_an_admin_creates_accounts_while_registration_is_closed(client, app, admin_headers):
    assert client.post("/api/users", json=ACCOUNT, headers=admin_headers).status_code == 201

    login = client.post("/api/auth/login", json={"username": "erin", "password": ACCOUNT["password"]})
    assert login.status_code == 200


@pytest.mark.app_config(**DOMAINS)
@pytest.mark.parametrize("email", ["erin@example.com", "Erin@EXAMPLE.COM", "erin@Corp.Example.org"])
def test_domain_registration_accepts_the_listed_domains_in_any_case(client, email):
    response = client.post("/api/auth/register", json=ACCOUNT | {"email": email})

    assert response.status_code == 201, response.get_json()
    assert response.get_json()["user"]["email"] == email.lower()


@pytest.mark.app_config(**DOMAINS)
@pytest.mark.parametrize(
    "email",
    [
        "erin@gmail.com",
        "erin@sub.example.com",  # a subdomain is another domain: list it to accept it
        "erin@example.com.evil.test",
        "erin@notexample.com",
        '"erin@example.com"@evil.test',
    ],
)
def test_domain_registration_refuses_other_domains_naming_the_accepted_ones(client, app, email):
    body = assert_error(client.post("/api/auth/register", json=ACCOUNT | {"email": email}), 403, "email")

    assert body["error"] == (
        "Registration is open only to email addresses at @example.com, @corp.example.org: use one, or ask an "
        "administrator to create your account."
    )
    assert body["details"] == {"email": ["Use an address at @example.com, @corp.example.org."]}
    assert usernames(app) == []


@pytest.mark.app_config(REGISTRATION="domain", ALLOWED_EMAIL_DOMAINS=parse_domains("exämple.com, bücher.de"))
@pytest.mark.parametrize("email", ["erin@exämple.com", "erin@EXÄMPLE.com", "erin@xn--exmple-cua.com"])
def test_domain_registration_matches_internationalised_domains_in_either_form(client, email):
    response = client.post("/api/auth/register", json=ACCOUNT | {"email": email})

    assert response.status_code == 201, response.get_json()


@pytest.mark.app_config(REGISTRATION="domain", ALLOWED_EMAIL_DOMAINS=parse_domains("exämple.com"))
def test_domain_registration_names_internationalised_domains_as_people_write_them(client):
    body = assert_error(client.post("/api/auth/register", json=ACCOUNT | {"email": "erin@example.com"}), 403, "email")

    assert body["details"] == {"email": ["Use an address at @exämple.com."]}


@pytest.mark.app_config(**DOMAINS)
def test_domain_registration_validates_the_body_first(client):
    assert_error(client.post("/api/auth/register", json=ACCOUNT | {"email": "not-an-email"}), 400, "email")


@pytest.mark.app_config(**DOMAINS)
def test_an_admin_creates_accounts_at_any_domain(client, admin_headers):
    response = client.post("/api/users", json=ACCOUNT | {"email": "erin@gmail.com"}, headers=admin_headers)

    assert response.status_code == 201


# The app as production builds it (real secrets, the real password hash), with registration open so that the
# password rules are what answers.
PRODUCTION_APP = {
    "APP_ENV": "production",
    "SECRET_KEY": PRODUCTION["SECRET_KEY"],
    "JWT_SECRET_KEY": PRODUCTION["JWT_SECRET_KEY"],
    "METRICS_TOKEN": PRODUCTION["METRICS_TOKEN"],
    "PASSWORD_HASH_METHOD": DEFAULT_PASSWORD_HASH_METHOD,
    "REGISTRATION": "open",
    "MAIL_BACKEND": "disabled",
}


@pytest.mark.app_config(**PRODUCTION_APP)
@pytest.mark.parametrize(
    "password", ["password123", "Admin123", "qwerty2024!", "demo-password", "aaaabbbb", "trustno1!", "P@$$w0rd"]
)
def test_production_refuses_well_known_passwords_for_every_account(client, app, admin_headers, password):
    expected = {"password": ["Must not be a well-known password such as 'admin123' or 'password123': choose a "
                             "passphrase of your own."]}  # fmt: skip

    registered = assert_error(client.post("/api/auth/register", json=ACCOUNT | {"password": password}), 400)
    created = assert_error(
        client.post("/api/users", json=ACCOUNT | {"password": password}, headers=admin_headers), 400, "password"
    )

    assert registered["details"] == created["details"] == expected
    assert usernames(app) == ["root"]


@pytest.mark.app_config(**PRODUCTION_APP)
def test_production_refuses_a_well_known_new_password(client, user, auth_headers):
    change = {"current_password": user["password"], "new_password": "Password1!"}

    body = assert_error(client.put("/api/auth/password", json=change, headers=auth_headers), 400, "new_password")

    assert "well-known password" in body["details"]["new_password"][0]


@pytest.fixture
def production(environment, redis_prefix) -> dict:
    """A production deployment as the docs describe it, with its first administrator, and nothing about
    registration set."""
    return (
        environment
        | PRODUCTION
        | {
            "RATELIMIT_KEY_PREFIX": redis_prefix,
            "ADMIN_USERNAME": "ops",
            "ADMIN_EMAIL": "ops@finstack.com",
            "ADMIN_PASSWORD": "ops-passphrase-1",
        }
    )


def test_production_registers_by_invitation_and_admins_create_accounts(servers, production):
    production |= {"FRONTEND_URL": "https://tasks.example.com", "MAIL_BACKEND": "disabled"}
    upgrade = subprocess.run(
        [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=production, capture_output=True, timeout=60
    )
    assert upgrade.returncode == 0, upgrade.stderr.decode()
    server = servers.start(GUNICORN, production)

    status, body = call("POST", f"{server.url}/api/auth/register", ACCOUNT)
    assert (status, body["error"]) == (
        403,
        "Registration is by invitation only: ask an administrator to invite you, then follow the link in the "
        "invitation's email.",
    )

    admin = call("POST", f"{server.url}/api/auth/login", {"username": "ops", "password": "ops-passphrase-1"})[1]
    status, created = call("POST", f"{server.url}/api/users", ACCOUNT, admin["access_token"])
    assert (status, set(created)) == (201, {"message", "user"})
    status, session = call("POST", f"{server.url}/api/auth/login", {"username": "erin", "password": "erin-passphrase"})
    assert (status, session["user"]["id"]) == (200, created["user"]["id"])

    status, _invited = call(
        "POST", f"{server.url}/api/invitations", {"email": "finn@example.com"}, admin["access_token"]
    )
    assert status == 201
    # Email is disabled here, so no link goes anywhere (and a sent message keeps no payload): the invitation's token
    # is set to one the test knows, as only its hash is stored.
    token = secrets.token_urlsafe(32)
    engine = sa.create_engine(normalise_database_url(production["DATABASE_URL"]))
    with engine.begin() as connection:
        update = sa.update(OneTimeToken).where(OneTimeToken.purpose == "invitation")
        assert connection.execute(update.values(token_hash=tokens.hash_token(token))).rowcount == 1
    engine.dispose()
    finn = {"token": token, "username": "finn", "full_name": "Finn Fo", "password": "finn-passphrase"}
    status, accepted = call("POST", f"{server.url}/api/auth/accept-invitation", finn)
    assert (status, accepted["user"]["email"], set(accepted)) == (
        201, "finn@example.com", {"message", "user", "access_token", "refresh_token"},
    )  # fmt: skip


def test_production_opens_registration_to_the_listed_domains(servers, production):
    domain = {"REGISTRATION": "domain", "ALLOWED_EMAIL_DOMAINS": "Example.com", "AUTO_MIGRATE": "true"}
    domain |= {"FRONTEND_URL": "https://tasks.example.com", "MAIL_BACKEND": "disabled"}
    server = servers.start(GUNICORN, production | domain)
    outsider = ACCOUNT | {"username": "eve", "email": "e@evil.test"}

    status, registered = call("POST", f"{server.url}/api/auth/register", ACCOUNT)
    assert (status, set(registered)) == (201, {"message", "user"})  # no tokens until the address is verified
    status, body = call("POST", f"{server.url}/api/auth/register", outsider)
    assert (status, body["details"]) == (403, {"email": ["Use an address at @example.com."]})
