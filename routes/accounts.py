"""Account flows that go through someone's inbox (issue 15): resetting a forgotten password, and changing one's
email address, each by a link that works once (tokens.py) in an email queued in the outbox (outbox.py)."""

from datetime import timedelta

from flask import Blueprint, current_app
from flask_jwt_extended import current_user, jwt_required
from marshmallow import ValidationError
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError

import outbox
import tokens
from config import ascii_domain, readable_domain
from models import LoginSession, User, db, utcnow
from routes import load_json, no_store
from routes.auth import email_link, end_sessions
from routes.errors import APIError
from routes.limits import forget_known_addresses, forgive_password_attempts, spend_email_to, spend_password_attempt
from schemas import (
    EmailChangeConfirmSchema,
    EmailChangeSchema,
    ForgotPasswordSchema,
    ResetPasswordSchema,
    UserSchema,
    check_password_policy,
)

RESET_LIFETIME = timedelta(hours=1)
RESET_LIFETIME_TEXT = "valid for 1 hour"
EMAIL_CHANGE_LIFETIME = timedelta(hours=24)
EMAIL_CHANGE_LIFETIME_TEXT = "24 hours"
FORGOT_ANSWER = (
    "If an active account uses this address, an email with a link to choose a new password is on its way: the link "
    "works once, for 1 hour."
)
INVALID_RESET = (
    "The token of this password reset link is not valid: it was used, it expired, or a change of password or address "
    "revoked it. Ask for a new link."
)
INVALID_EMAIL_CHANGE = (
    "The token of this confirmation link is not valid: it was used, it expired, or a newer request replaced it. Ask "
    "for a new link."
)
EMAIL_TAKEN = "This email is already registered."

bp = Blueprint("accounts", __name__, url_prefix="/api/auth")
bp.after_request(no_store)
user_schema = UserSchema()


@bp.post("/forgot-password")
def forgot_password():
    """Ask for a link to choose a new password: the same 202 whether or not an active account uses the address.

    Both cases do the same work, so neither the answer nor the time it takes tells which addresses have accounts:
    one SELECT of the active account with that address, one INSERT of a token, one INSERT of one email into the
    outbox, one commit (test_accounts.py compares the statements). With an account, the email holds the link (the
    token, valid 1 hour); without one, the token is never sent (nobody can use it: it only records the request)
    and the email tells the address's owner that no active account uses it, which also helps someone who tried the
    wrong one of their addresses. An email in both cases, so that what follows the answer is alike too: the commit's
    hand-over to the senders, their composing and sending, and the outbox's rows. RATELIMIT_ACCOUNT_EMAIL bounds
    what any one address is sent, with or without an account.

    Earlier links stay valid until they expire: mail can arrive late or out of order, and whichever link the person
    follows should work. Using one revokes the rest, and so does any change of password.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: ForgotPasswordSchema}}}
    responses:
      202: {description: Accepted; an email is on its way., content: {application/json: {schema: MessageSchema}}}
    """
    email = load_json(ForgotPasswordSchema())["email"]
    spend_email_to(email)
    now = utcnow()
    user = db.session.scalar(select(User).where(User.email == email, User.is_active))
    token, raw = tokens.issue(
        "password_reset", email, lifetime=RESET_LIFETIME, now=now, user_id=user.id if user is not None else None
    )
    if user is not None:
        payload = {
            "full_name": user.full_name,
            "link": email_link("reset-password", raw),
            "expires_in": RESET_LIFETIME_TEXT,
        }
        outbox.add("password_reset", email, f"password-reset:{token.id}", payload, now)
    else:
        outbox.add("password_reset_no_account", email, f"password-reset:{token.id}", {"email": email}, now)
    db.session.commit()
    return {"message": FORGOT_ANSWER}, 202


def invalid_reset() -> APIError:
    return APIError(INVALID_RESET, 400, {"token": ["Not a valid password reset token."]})


@bp.post("/reset-password")
def reset_password():
    """Choose a new password with the token from a reset link; every session of the account is logged out.

    The token works once, for 1 hour; the account's other reset links die with it. A token that is wrong, used,
    expired or revoked (by a newer password or address) is a 400, one message for all. A password the rules refuse
    is a 400 too, and leaves the token as it was.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: ResetPasswordSchema}}}
    responses:
      200: {description: Changed; sign in with the new password., content: {application/json: {schema: MessageSchema}}}
    """
    data = load_json(ResetPasswordSchema())
    now = utcnow()
    # The account locked (a login in flight finishes first, and its session is ended below with the others), and the
    # token used; an error below rolls this back.
    token, user = tokens.consume_for_account("password_reset", data["token"], now) or (None, None)
    if user is None or not user.is_active or user.email != token.email:
        raise invalid_reset()
    check_password_policy(data["password"], user.username, user.email)
    user.set_password(data["password"])
    if user.email_verified_at is None:
        user.email_verified_at = now  # the link reached the address: that is what verifying it proves
    tokens.revoke(tokens.ACCOUNT_LINKS, now, user_id=user.id)  # a pending email change must not outlive this
    ended = end_sessions(LoginSession.user_id == user.id)
    forget_known_addresses(user.username)  # the addresses the old password signed in from
    forgive_password_attempts(user.username)  # the owner, locked out here perhaps, can sign in at once
    db.session.commit()
    current_app.logger.info("Password of user %s reset by link; %d session(s) ended", user.id, ended)
    return {"message": "Password changed: sign in with your new password. Every session was logged out."}


def refuse_other_domains(email: str) -> None:
    """With REGISTRATION=domain, an account's address stays at one of ALLOWED_EMAIL_DOMAINS (a 403), as it had to
    be to register; otherwise any address will do."""
    if current_app.config["REGISTRATION"] != "domain":
        return
    domains = current_app.config["ALLOWED_EMAIL_DOMAINS"]
    if ascii_domain(email.rpartition("@")[2]) not in domains:
        accepted = ", ".join(f"@{readable_domain(domain)}" for domain in domains)
        raise APIError(
            f"Accounts here use email addresses at {accepted}: choose one there.",
            403,
            {"email": [f"Use an address at {accepted}."]},
        )


@bp.post("/me/email")
@jwt_required()
def request_email_change():
    """Change one's email address: a link to the new address confirms it, and the current one is told.

    The current password is required (a wrong one spends the same budget as a failed login). Nothing changes until
    the link, valid 24 hours, is followed (``POST /api/auth/confirm-email-change``); a newer request replaces it. The
    email to the current address has no link: it says what was asked, so that its owner can act if it was not them.
    ---
    requestBody: {required: true, content: {application/json: {schema: EmailChangeSchema}}}
    responses:
      202: {description: Accepted; the link is on its way., content: {application/json: {schema: MessageSchema}}}
      403:
        description: With REGISTRATION=domain, the address is not at one of ALLOWED_EMAIL_DOMAINS.
        content: {application/json: {schema: ErrorSchema}}
      409: {$ref: "#/components/responses/Conflict"}
    """
    data = load_json(EmailChangeSchema())
    user = current_user
    spend_password_attempt(user.username)  # a stolen access token must not make guessing cheap
    # Locked, so that two requests at once take turns: the second replaces the first's link.
    db.session.refresh(user, with_for_update={"key_share": True})
    if not user.check_password(data["password"]):
        raise ValidationError("Not your current password.", "password")
    forgive_password_attempts(user.username)
    new_email = data["email"]
    if new_email == user.email:
        raise APIError("This is already your email address.", 400, {"email": ["Already your email address."]})
    if db.session.scalar(select(exists().where(User.email == new_email))):
        raise APIError(EMAIL_TAKEN, 409, {"email": [EMAIL_TAKEN]})
    refuse_other_domains(new_email)
    spend_email_to(new_email)
    now = utcnow()
    tokens.revoke("email_change", now, user_id=user.id)
    token, raw = tokens.issue(
        "email_change",
        new_email,
        lifetime=EMAIL_CHANGE_LIFETIME,
        now=now,
        user_id=user.id,
        data={"old_email": user.email},
    )
    event = f"email-change:{token.id}"
    confirm = {
        "full_name": user.full_name,
        "new_email": new_email,
        "link": email_link("confirm-email-change", raw),
        "expires_in": f"valid for {EMAIL_CHANGE_LIFETIME_TEXT}",
    }
    outbox.add("email_change_confirm", new_email, event, confirm, now)
    requested = {"full_name": user.full_name, "new_email": new_email, "expires_in": EMAIL_CHANGE_LIFETIME_TEXT}
    outbox.add("email_change_requested", user.email, event, requested, now)
    db.session.commit()
    message = (
        f"Check your inbox at {new_email}: follow the link we sent there within 24 hours to confirm the change. "
        "Until then your address stays as it is."
    )
    return {"message": message}, 202


def invalid_email_change() -> APIError:
    return APIError(INVALID_EMAIL_CHANGE, 400, {"token": ["Not a valid confirmation token."]})


@bp.post("/confirm-email-change")
def confirm_email_change():
    """Confirm a new email address with the token from the link sent to it: the account's address changes, counts
    as verified, and the old address is told.

    No sign-in is needed: the link may be opened on another device. The token works once, for 24 hours. A token
    that is wrong, used, expired or replaced is a 400, one message for all. If another account has taken the
    address meanwhile, a 409, and the token stays as it was (it works if the address is freed within its 24 hours).
    Reset links sent to the old address stop working.
    ---
    security: []
    requestBody: {required: true, content: {application/json: {schema: EmailChangeConfirmSchema}}}
    responses:
      200: {description: The account with its new address., content: {application/json: {schema: UserUpdatedSchema}}}
      409: {$ref: "#/components/responses/Conflict"}
    """
    data = load_json(EmailChangeConfirmSchema())
    now = utcnow()
    # The account locked, and the token used; an error below rolls this back.
    token, user = tokens.consume_for_account("email_change", data["token"], now) or (None, None)
    if user is None or not user.is_active or (token.data or {}).get("old_email") != user.email:
        raise invalid_email_change()  # the account is gone, or its address changed since the link was sent
    old_email = user.email
    user.email = token.email
    user.email_verified_at = now
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()  # the unique constraint decides, so two accounts confirming one address get one 409
        raise APIError(EMAIL_TAKEN, 409, {"email": [EMAIL_TAKEN]}) from None
    tokens.revoke(tokens.ACCOUNT_LINKS, now, user_id=user.id)  # links sent to the old address
    payload = {"full_name": user.full_name, "new_email": user.email}
    outbox.add("email_changed", old_email, f"email-changed:{token.id}", payload, now)
    db.session.commit()
    return {"message": f"Email address changed to {user.email}.", "user": user_schema.dump(user)}
