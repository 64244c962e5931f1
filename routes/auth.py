"""Accounts and sessions: register (and verify the address, where REGISTRATION=domain asks for it), log in, refresh,
log out, change the password; the JWT wiring lives here too."""

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import chain

from cachetools import TLRUCache, TTLCache
from flask import Blueprint, Flask, current_app, g, has_app_context, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    current_user,
    decode_token,
    get_jwt,
    jwt_required,
)
from marshmallow import ValidationError
from sqlalchemy import event, exists, null, or_, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, make_transient_to_detached
from werkzeug.security import check_password_hash, generate_password_hash

import outbox
import tokens
from config import ascii_domain, readable_domain
from models import LoginSession, RevokedToken, User, db, insert, utcnow
from routes import load_json, no_store
from routes.errors import ACCOUNT_GONE, TOKEN_REVOKED, APIError
from routes.limits import (
    CountingRedisStorage,
    forget_known_addresses,
    forgive_password_attempts,
    spend_email_to,
    spend_password_attempt,
)
from schemas import (
    LoginSchema,
    PasswordChangeSchema,
    RefreshSchema,
    RegisterSchema,
    ResendVerificationSchema,
    UserSchema,
    VerifyEmailSchema,
    check_password_policy,
)

# How long an address's verification link (REGISTRATION=domain) works.
VERIFICATION_LIFETIME = timedelta(hours=48)
VERIFICATION_LIFETIME_TEXT = "valid for 48 hours"
INVALID_VERIFICATION = (
    "This verification link is not valid: it was used or replaced by a newer one, or it expired. Ask for a new one."
)
RESEND_ANSWER = (
    "If an account with this address is waiting for verification, a new link is on its way to it: it works for 48 "
    "hours, and only the newest link works."
)

# Cached token owners live this long at most: how late an account change can reach another instance if Redis was
# out of reach when it was made (otherwise the accounts' epoch makes it immediate; see AuthCache).
OWNER_CACHE_SECONDS = 60
CACHED_TOKENS = 10_000


@dataclass
class AuthCache:
    """What one app remembers in this process between requests, so that checking a token neither decodes it nor
    reads the database while nothing about it has changed. Per app: apps in one process have their own keys.

    - ``claims``: each token whose signature and claims were verified, until it expires.
    - ``owners``: each token's user (column values) and whether the token or its session is revoked, as of an
      *accounts epoch*: a random value in Redis that the rate limiter reads in its round trip, before the request
      reads the database (routes/limits.py). A commit that changed a user or the blocklist starts a new epoch
      after it commits, so every instance's next request reads afresh: a request that read the old epoch either
      began before the change was committed, or reads it from the database. With no epoch (limits in memory,
      Redis out of reach) owners are read every time, as they are without a cache.

    Only changes made through an ORM session are seen (the app's writes, its CLI commands): after editing users or
    the blocklist in SQL, run `flask new-accounts-epoch`, or allow OWNER_CACHE_SECONDS. The signing key and the
    leeway are read once, when the app starts, as they are everywhere else."""

    claims: TLRUCache
    owners: TTLCache
    lock: threading.Lock = field(default_factory=threading.Lock)
    epoch_owed: bool = False  # a new epoch could not be started in Redis: the next request that reaches it does

    @classmethod
    def for_app(cls, app: Flask, clock: Callable[[], float] | None = None) -> "AuthCache":
        leeway = app.config.get("JWT_DECODE_LEEWAY", 0)
        leeway = leeway.total_seconds() if isinstance(leeway, timedelta) else leeway
        expires = lambda _key, claims, _now: claims["exp"] + leeway  # noqa: E731 (the tokens' own clock: wall time)
        return cls(
            claims=TLRUCache(CACHED_TOKENS, ttu=expires, timer=clock or time.time),
            owners=TTLCache(CACHED_TOKENS, ttl=OWNER_CACHE_SECONDS, timer=clock or time.monotonic),
        )

    def owner(self, jti: str, epoch: bytes | None) -> tuple[User | None, bool] | None:
        """The token's owner, as remembered in this epoch (attached to this request's session), if it is."""
        with self.lock:
            remembered = self.owners.get(jti) if epoch is not None else None
        if remembered is None or remembered[0] != epoch:
            return None
        _epoch, values, revoked = remembered
        if values is None:
            return None, revoked
        user = User(**values)
        make_transient_to_detached(user)  # as if loaded: no history, no INSERT
        return db.session.merge(user, load=False), revoked

    def remember(self, jti: str, epoch: bytes, user: User | None, revoked: bool) -> None:
        values = None if user is None else {column.key: getattr(user, column.key) for column in USER_COLUMNS}
        with self.lock:
            self.owners[jti] = (epoch, values, revoked)

    def forget_owners(self) -> None:
        with self.lock:
            self.owners.clear()


USER_COLUMNS = sa_inspect(User).column_attrs


def auth_cache() -> AuthCache:
    return current_app.extensions["finstack.auth"]


class RequestJWTManager(JWTManager):
    """Flask-JWT-Extended's manager, decoding a token once per app and process until it expires (AuthCache): the
    rate limiter's key (the caller's account) and the login check both need it on every request, and each decode
    checks the signature and every claim. A refused token is not remembered: it is refused afresh each time."""

    def init_app(self, app: Flask, add_context_processor: bool = False) -> None:
        super().init_app(app, add_context_processor)
        app.extensions["finstack.auth"] = AuthCache.for_app(app)

    def _decode_jwt_from_config(self, encoded_token: str, csrf_value=None, allow_expired: bool = False) -> dict:
        if allow_expired:
            return super()._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)
        cache = auth_cache()
        with cache.lock:
            claims = cache.claims.get((encoded_token, csrf_value))
        if claims is None:
            claims = super()._decode_jwt_from_config(encoded_token, csrf_value)
            if isinstance(claims.get("exp"), int | float):  # every token this app issues expires
                with cache.lock:
                    cache.claims[encoded_token, csrf_value] = claims
        return dict(claims)


bp = Blueprint("auth", __name__, url_prefix="/api/auth")
bp.after_request(no_store)
jwt = RequestJWTManager()
user_schema = UserSchema()


@bp.before_app_request
def accept_any_case_bearer() -> None:
    """HTTP auth schemes are case-insensitive (RFC 7235): "bearer <token>" works like "Bearer <token>"."""
    scheme, _, token = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and scheme != "Bearer":
        request.environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"


@jwt.user_identity_loader
def user_identity(user: User) -> str:
    return str(user.id)


@jwt.user_lookup_loader
def load_user(_header: dict, payload: dict) -> User | None:
    """Load the token's user on every request, so deleted and deactivated accounts lose access at once."""
    user, _revoked = token_owner(payload)
    return user if user is not None and user.is_active else None


def token_owner(payload: dict) -> tuple[User | None, bool]:
    """The token's user, and whether the token or its login session is on the blocklist: one query, made once
    per request for both JWT checks, and none while this process remembers the answer (AuthCache)."""
    cached = g.get("token_owner")
    if cached is not None and cached[0] == payload.get("jti"):
        return cached[1]
    sid = session_id(payload)
    try:
        user_id = uuid.UUID(payload["sub"])
    except (KeyError, TypeError, ValueError, AttributeError):
        user_id = None
    if sid is None or user_id is None:
        owner = (None, True)  # every token this app issues names its user and its session
    else:
        cache, epoch = auth_cache(), g.get("accounts_epoch")
        if epoch is not None and cache.epoch_owed:  # Redis is back: start the epoch it missed, then read afresh
            start_accounts_epoch()
            epoch = None
        owner = cache.owner(payload["jti"], epoch)
        if owner is None:
            revoked = exists().where(RevokedToken.jti.in_((payload["jti"], str(sid))))
            row = db.session.execute(select(User, revoked.label("revoked")).where(User.id == user_id)).first()
            owner = (row.User, row.revoked) if row is not None else (None, False)
            if epoch is not None:
                cache.remember(payload["jti"], epoch, *owner)
            elif "accounts_epoch" in g and g.accounts_epoch is None:  # Redis has none (new, or lost its data)
                start_accounts_epoch(missing=True)
    g.token_owner = (payload.get("jti"), owner)
    return owner


def start_accounts_epoch(missing: bool = False) -> None:
    """Make every process forget the token owners it remembers (AuthCache); ``missing``: only if Redis has no epoch.

    While Flask-Limiter counts in memory because Redis failed, nothing is sent (an account change must not wait
    on a store known to be down): the epoch is owed, and started by this process's first request that reaches
    Redis again. Meanwhile no process remembers anything new, having no epoch to remember it by."""
    cache = auth_cache()
    if not missing:
        cache.forget_owners()  # this process at once, whatever happens to Redis
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None or not isinstance(limiter.storage, CountingRedisStorage):
        return
    if getattr(limiter, "_storage_dead", False):
        cache.epoch_owed = cache.epoch_owed or not missing
        return
    try:
        limiter.storage.start_accounts_epoch(missing)
        cache.epoch_owed = cache.epoch_owed and missing
    except Exception:
        cache.epoch_owed = cache.epoch_owed or not missing
        current_app.logger.exception(
            "Could not start a new accounts epoch in Redis: other instances may accept this change's tokens for up "
            "to %d s",
            OWNER_CACHE_SECONDS,
        )


def note_account_change(session: Session, *_args) -> None:
    """A flush that changes users or revokes tokens: a new accounts epoch once it commits. A new user is in no
    cache, and a blocklist row deleted has expired with its token: neither needs one."""
    changed = chain(session.dirty, session.deleted, (item for item in session.new if isinstance(item, RevokedToken)))
    if any(isinstance(instance, User | RevokedToken) for instance in changed):
        session.info["accounts_changed"] = True


def note_account_statement(state: ORMExecuteState) -> None:
    """The same for a statement (``session.execute(update(User)...)``, ``insert(RevokedToken)``)."""
    table = getattr(state.statement, "table", None) if state.statement.is_dml else None
    if table is None:
        return
    if (table.name == User.__tablename__ and not state.is_insert) or (
        table.name == RevokedToken.__tablename__ and state.is_insert
    ):
        state.session.info["accounts_changed"] = True


def new_epoch_after_commit(session: Session) -> None:
    if session.info.pop("accounts_changed", False) and has_app_context():
        start_accounts_epoch()


def forget_rolled_back_changes(session: Session, previous: SessionTransaction) -> None:
    """Only the outermost rollback undoes the changes: a savepoint's leaves what was flushed before it."""
    if previous.parent is None and not previous.nested:
        session.info.pop("accounts_changed", None)


for _event, _listener in (
    ("after_flush", note_account_change),
    ("do_orm_execute", note_account_statement),
    ("after_commit", new_epoch_after_commit),
    ("after_soft_rollback", forget_rolled_back_changes),
):
    if not event.contains(Session, _event, _listener):  # every session: the app's, the CLI's, the tests'
        event.listen(Session, _event, _listener)


def create_user(username: str, email: str, password: str, full_name: str, is_admin: bool = False) -> User:
    """Add a user to the session; the caller commits and handles a duplicate with ``duplicate_user``."""
    user = User(username=username, email=email, full_name=full_name, is_admin=is_admin)
    user.set_password(password)
    db.session.add(user)
    return user


def duplicate_user(username: str, email: str) -> APIError:
    """The 409 for a username or email already taken (run after the failed insert was rolled back)."""
    taken = db.session.execute(
        select(User.username, User.email).where(or_(User.username == username, User.email == email))
    ).all()
    details = {}
    if any(row.username == username for row in taken):
        details["username"] = ["This username is already taken."]
    if any(row.email == email for row in taken):
        details["email"] = ["This email is already registered."]
    message = " ".join(messages[0] for messages in details.values()) or "This account already exists."
    return APIError(message, 409, details)


@cache
def stand_in_hash(method: str) -> str:
    """A hash of a random password, to check when the username is unknown."""
    return generate_password_hash(secrets.token_urlsafe(), method=method)


def authenticate(username: str, password: str) -> User | None:
    """The active user with these credentials. An unknown username costs the same hash check as a wrong
    password, so response times do not tell which usernames exist."""
    # The row stays locked until the commit: a password change or deactivation running at the same time
    # either waits for this login (and then ends its session) or goes first (and then this login fails).
    user = db.session.scalar(select(User).where(User.username == username).with_for_update(key_share=True))
    if user is None:
        check_password_hash(stand_in_hash(current_app.config["PASSWORD_HASH_METHOD"]), password)
        return None
    return user if user.check_password(password) and user.is_active else None


def start_session(user: User) -> dict:
    """A new login session for ``user`` (flushed already) and its first tokens; the caller commits."""
    session = LoginSession(id=uuid.uuid4(), user_id=user.id)
    db.session.add(session)
    return issue_tokens(session, user)


def issue_tokens(session: LoginSession, user: User) -> dict:
    """An access token and a refresh token for the session; only this refresh token may refresh it next."""
    claims = {"sid": str(session.id)}
    access_token = create_access_token(user, additional_claims=claims)
    refresh_token = create_refresh_token(user, additional_claims=claims)
    refresh = decode_token(refresh_token)
    session.refresh_jti = refresh["jti"]
    session.expires_at = datetime.fromtimestamp(refresh["exp"], UTC)
    return {"access_token": access_token, "refresh_token": refresh_token}


def session_id(payload: dict) -> uuid.UUID | None:
    """The login session a token belongs to (every token this app issues names one)."""
    try:
        return uuid.UUID(payload["sid"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


@jwt.token_in_blocklist_loader
def is_revoked(_header: dict, payload: dict) -> bool:
    """Is this token, or the login session it belongs to, on the blocklist? Tokens without a session never pass."""
    return bool(token_owner(payload)[1])


def revoke(expiry_by_id: dict[str, datetime]) -> None:
    """Blocklist token or session ids until their expiry; ids already there stay as they are."""
    if not expiry_by_id:
        return
    now = utcnow()
    rows = [{"jti": key, "expires_at": expires_at, "revoked_at": now} for key, expires_at in expiry_by_id.items()]
    db.session.execute(insert(RevokedToken).values(rows).on_conflict_do_nothing(index_elements=["jti"]))


def end_sessions(*conditions) -> int:
    """Revoke the live login sessions matching ``conditions``: every access and refresh token issued in them.
    The sessions are locked first, so a refresh in flight either completes before or sees them revoked."""
    sessions = db.session.scalars(
        select(LoginSession)
        .where(LoginSession.expires_at > utcnow(), *conditions)
        .order_by(LoginSession.id)
        .with_for_update()
    ).all()
    revoke({str(session.id): session.expires_at for session in sessions})
    return len(sessions)


def revoked_now(payload: dict) -> bool:
    """Read the blocklist again (after taking a lock), whatever this request has read before."""
    keys = (payload["jti"], payload["sid"])
    return bool(db.session.scalar(select(exists().where(RevokedToken.jti.in_(keys)))))


def session_response(message: str, user: User, tokens: dict) -> dict:
    return {"message": message, "user": user_schema.dump(user), **tokens}


def presented_refresh_token() -> str:
    """The refresh token: ``{"refresh_token": ...}`` in the body, else the Authorization header's bearer token."""
    if request.get_data(cache=True).strip():
        token = load_json(RefreshSchema()).get("refresh_token")
        if token:
            return token
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme == "Bearer" and token.strip():
        return token.strip()
    raise APIError(
        'Send the refresh token as {"refresh_token": "..."} or as an \'Authorization: Bearer <refresh_token>\' header.',
        401,
    )


def refuse_if_closed() -> None:
    """Refuse (403) every registration while REGISTRATION is closed or by invitation, before the body is read."""
    mode = current_app.config["REGISTRATION"]
    if mode == "closed":
        raise APIError("Registration is closed: ask an administrator to create your account.", 403)
    if mode == "invite":
        raise APIError(
            "Registration is by invitation only: ask an administrator to invite you, then follow the link in the "
            "invitation's email.",
            403,
        )


def refuse_outside_domains(email: str) -> None:
    """In domain mode, refuse (403) an address whose domain (after the last @, in any case, internationalised names
    in their ASCII form) is not one of ALLOWED_EMAIL_DOMAINS."""
    if current_app.config["REGISTRATION"] != "domain":
        return
    domains = current_app.config["ALLOWED_EMAIL_DOMAINS"]
    if ascii_domain(email.rpartition("@")[2]) not in domains:
        accepted = ", ".join(f"@{readable_domain(domain)}" for domain in domains)
        raise APIError(
            f"Registration is open only to email addresses at {accepted}: use one, or ask an administrator to "
            "create your account.",
            403,
            {"email": [f"Use an address at {accepted}."]},
        )


def email_link(page: str, raw_token: str) -> str:
    """The web app's page that takes ``raw_token`` from the link and calls the API with it. FRONTEND_URL is unset
    only where no email is sent (production demands it otherwise): the link is then relative, and goes nowhere."""
    return f"{current_app.config['FRONTEND_URL'] or ''}/{page}?token={raw_token}"


def send_verification(email: str, now: datetime, user: User | None) -> None:
    """Email ``email`` a new link that verifies the address of ``user``, an account waiting for it (any earlier link
    stops working); with no such account, an email saying that nothing waits for verification there. The same
    statements either way (a revocation, a token, an email), so neither the answer nor its time tells one from the
    other: the token without an account is never sent, and only records the request."""
    tokens.revoke("email_verification", now, email=email)
    user_id = user.id if user is not None else None
    token, raw = tokens.issue("email_verification", email, lifetime=VERIFICATION_LIFETIME, now=now, user_id=user_id)
    event_key = f"email-verification:{token.id}"
    if user is not None:
        payload = {
            "full_name": user.full_name,
            "link": email_link("verify-email", raw),
            "expires_in": VERIFICATION_LIFETIME_TEXT,
        }
        outbox.add("email_verification", email, event_key, payload, now)
    else:
        outbox.add("email_verification_not_needed", email, event_key, {"email": email}, now)


@bp.post("/register")
def register():
    """Create an account and log it in, as far as REGISTRATION allows (see the 403).

    With REGISTRATION=domain the account waits for its address to be verified: the answer has no tokens, a link goes
    to the address, and POST /api/auth/verify-email with the link's token verifies it and signs in.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: RegisterSchema}}}
    responses:
      201:
        description: The account and a new session's tokens; with REGISTRATION=domain the account only (no tokens),
          its address to be verified.
        content: {application/json: {schema: RegisteredSchema}}
      403:
        description: Registration is closed (REGISTRATION=closed) or by invitation only (REGISTRATION=invite), or the
          email's domain is not one of ALLOWED_EMAIL_DOMAINS (REGISTRATION=domain; details.email names the accepted
          domains).
        content: {application/json: {schema: ErrorSchema}}
      409: {$ref: "#/components/responses/Conflict"}
    """
    refuse_if_closed()
    data = load_json(RegisterSchema())
    refuse_outside_domains(data["email"])
    verify = current_app.config["REGISTRATION"] == "domain"
    user = create_user(**data)
    if verify:
        # NULL until the link is followed (login refuses it meanwhile); None would let the column's default fire.
        user.email_verified_at = null()
    try:
        db.session.flush()
    except IntegrityError:
        # The unique constraints decide, so parallel registrations of one name give one 201 and 409s.
        db.session.rollback()
        raise duplicate_user(data["username"], data["email"]) from None
    if verify:
        send_verification(user.email, utcnow(), user)
        db.session.commit()
        message = (
            f"Account created. To sign in, verify your address: follow the link we sent to {user.email} (it works for "
            "48 hours)."
        )
        return {"message": message, "user": user_schema.dump(user)}, 201
    session_tokens = start_session(user)
    db.session.commit()
    return session_response("Registration successful.", user, session_tokens), 201


def invalid_verification() -> APIError:
    return APIError(INVALID_VERIFICATION, 400, {"token": ["Not a valid verification token."]})


@bp.post("/verify-email")
def verify_email():
    """Verify an account's address with the token from its verification link, and sign in.

    The token works once, for 48 hours, and only the newest link of an account works; any other token is a 400 (one
    message for all).
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: VerifyEmailSchema}}}
    responses:
      200:
        description: The account, verified, and a new session's tokens.
        content: {application/json: {schema: SessionSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
    """
    data = load_json(VerifyEmailSchema())
    now = utcnow()
    token, user = tokens.consume_for_account("email_verification", data["token"], now) or (None, None)
    if user is None or user.email != token.email:  # the account changed its address since: this link is not for it
        raise invalid_verification()
    if not user.is_active:
        raise APIError(ACCOUNT_GONE, 403)
    if user.email_verified_at is not None:  # verified since (a reset link, say): this link no longer signs anyone in
        raise invalid_verification()
    user.email_verified_at = now
    session_tokens = start_session(user)
    db.session.commit()
    return session_response("Email address verified: welcome.", user, session_tokens)


@bp.post("/resend-verification")
def resend_verification():
    """Ask for a new verification link for an address: the same 202, after the same work, whether or not an account
    waits for verification there, so it tells nobody which addresses have accounts.

    Only with REGISTRATION=domain, where accounts wait for verification, and for an address at one of
    ALLOWED_EMAIL_DOMAINS (else the registration's 403); in any other mode the answer is the same 202 and nothing is
    sent. An account waiting at the address gets a new link, which replaces the earlier ones; any other address gets
    an email saying that nothing there waits for verification. RATELIMIT_ACCOUNT_EMAIL bounds what one address is
    sent (3 emails an hour and 10 a day by default, counted with password resets and address changes): past it,
    asking is a 429 for that address, whatever it is.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: ResendVerificationSchema}}}
    responses:
      202: {description: Accepted., content: {application/json: {schema: MessageSchema}}}
      403:
        description: The email's domain is not one of ALLOWED_EMAIL_DOMAINS (details.email names the accepted ones).
        content: {application/json: {schema: ErrorSchema}}
    """
    email = load_json(ResendVerificationSchema())["email"]
    if current_app.config["REGISTRATION"] != "domain":
        return {"message": RESEND_ANSWER}, 202  # no account waits for verification: nobody is sent anything
    refuse_outside_domains(email)
    spend_email_to(email)
    now = utcnow()
    # Locked (FOR NO KEY UPDATE), so that requests at once for one account take turns and only the newest link works;
    # the account before its links, as in every request that locks both (tokens.consume_for_account).
    waiting = select(User).where(User.email == email, User.is_active, User.email_verified_at.is_(None))
    send_verification(email, now, db.session.scalar(waiting.with_for_update(key_share=True)))
    db.session.commit()
    return {"message": RESEND_ANSWER}, 202


@bp.post("/login")
def login():
    """Exchange a username and password for an access token and a refresh token.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: LoginSchema}}}
    responses:
      200: {description: The user and a new session's tokens., content: {application/json: {schema: SessionSchema}}}
      401: {$ref: "#/components/responses/Unauthorized"}
      403:
        description: The password is right, but the account's address is not verified yet (it registered with
          REGISTRATION=domain); details.email is the address and details.email_verified is false.
        content: {application/json: {schema: ErrorSchema}}
    """
    data = load_json(LoginSchema())
    spend_password_attempt(data["username"])
    user = authenticate(data["username"], data["password"])
    if user is None:
        raise APIError("Invalid username or password.", 401)
    forgive_password_attempts(data["username"])
    if user.email_verified_at is None:
        raise APIError(
            f"Verify your email address before signing in: follow the link we sent to {user.email}, or ask for a new "
            "one.",
            403,
            {"email": user.email, "email_verified": False},
        )
    if user.password_needs_rehash():
        user.set_password(data["password"])  # made with older, weaker parameters: upgrade it now we know it
    session_tokens = start_session(user)
    db.session.commit()
    return session_response("Login successful.", user, session_tokens)


@bp.post("/refresh")
def refresh():
    """A new access token and a new refresh token for a refresh token, which is then spent: presenting a spent
    one again means it was copied, so the whole login session is revoked.

    Send the refresh token as the Bearer token or as ``{"refresh_token": "..."}`` in the body.
    ---
    security: [{}, {refreshToken: []}]
    requestBody: {required: false, content: {application/json: {schema: RefreshSchema}}}
    responses:
      200: {description: A new pair of tokens., content: {application/json: {schema: TokenPairSchema}}}
      401: {$ref: "#/components/responses/Unauthorized"}
    """
    payload = decode_token(presented_refresh_token())  # bad, tampered and expired tokens: 401 via the JWT callbacks
    if payload.get("type") != "refresh":
        raise APIError("Send a refresh token here, not an access token.", 401)
    sid = session_id(payload)
    session = sid and db.session.get(LoginSession, sid, with_for_update=True)  # one refresh of a session at a time
    if session is None or str(session.user_id) != payload["sub"] or revoked_now(payload):
        raise APIError(TOKEN_REVOKED, 401)
    if session.refresh_jti != payload["jti"]:
        end_sessions(LoginSession.id == session.id)
        db.session.commit()
        current_app.logger.warning(
            "Spent refresh token presented again from %s: revoked session %s of user %s.",
            request.remote_addr, session.id, session.user_id,
        )  # fmt: skip
        raise APIError("This refresh token was already used, so its session has been ended: log in again.", 401)
    user = load_user({}, payload)
    if user is None:
        raise APIError(ACCOUNT_GONE, 401)
    tokens = issue_tokens(session, user)
    db.session.commit()
    return tokens


@bp.post("/logout")
@jwt_required(verify_type=False)
def logout():
    """End this login: the presented token, its refresh token and every access token of its session stop working.

    Send the access token or the refresh token.
    ---
    responses:
      200: {description: Logged out., content: {application/json: {schema: MessageSchema}}}
    """
    payload = get_jwt()
    session = db.session.get(LoginSession, session_id(payload), with_for_update=True)
    revoked = {payload["jti"]: datetime.fromtimestamp(payload["exp"], UTC)}
    if session is not None:
        revoked[str(session.id)] = session.expires_at
    revoke(revoked)
    db.session.commit()
    return {"message": "Logged out."}


@bp.put("/password")
@jwt_required()
def change_password():
    """Change one's password; every other session of the account is logged out.

    Password reset links sent earlier stop working.
    ---
    requestBody: {required: true, content: {application/json: {schema: PasswordChangeSchema}}}
    responses:
      200: {description: Changed., content: {application/json: {schema: PasswordChangedSchema}}}
    """
    data = load_json(PasswordChangeSchema())
    user = current_user
    check_password_policy(data["new_password"], user.username, user.email, "new_password")
    spend_password_attempt(user.username)  # a stolen access token must not make guessing cheap
    # Lock the account, so a login or another change in flight finishes first and is seen below.
    db.session.refresh(user, with_for_update={"key_share": True})
    if revoked_now(get_jwt()):
        raise APIError(TOKEN_REVOKED, 401)  # another change of password has just ended this session
    if not user.check_password(data["current_password"]):
        raise ValidationError("Not your current password.", "current_password")
    forget_known_addresses(user.username)  # those the old password signed in from; this one is known again below
    forgive_password_attempts(user.username)
    user.set_password(data["new_password"])
    tokens.revoke(tokens.ACCOUNT_LINKS, utcnow(), user_id=user.id)  # links asked for earlier must not undo this
    ended = end_sessions(LoginSession.user_id == user.id, LoginSession.id != session_id(get_jwt()))
    db.session.commit()
    return {"message": f"Password changed. {ended} other session(s) logged out.", "sessions_ended": ended}


@bp.get("/me")
@jwt_required()
def me():
    """The user the access token belongs to.
    ---
    responses:
      200: {description: The user., content: {application/json: {schema: UserResponseSchema}}}
    """
    return {"user": user_schema.dump(current_user)}
