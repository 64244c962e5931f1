"""Email: a message built from the templates under ``templates/mail/``, and its delivery by MAIL_BACKEND.

The outbox calls ``compose`` and ``deliver`` for each row it sends, inside an app context. ``deliver`` raises
``PermanentMailError`` when the server refuses the message for good (retrying cannot help: park it) and
``TransientMailError`` for anything that may pass (try again later). Standard library only: smtplib and email are
better kept than any Flask mail extension."""

import contextlib
import logging
import os
import re
import smtplib
import socket
import ssl
import tempfile
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from pathlib import Path

from flask import current_app
from jinja2 import Environment, StrictUndefined, Template

log = logging.getLogger(__name__)

# The Message-ID's left-hand side names the .eml file, so it is kept to characters safe in both.
# A whole sending may take this many MAIL_TIMEOUTs (60 s by default), well within the outbox's 2-minute lease.
SEND_DEADLINE_TIMEOUTS = 6
MESSAGE_ID_LOCAL_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class MailError(Exception):
    """The message was not delivered."""


class PermanentMailError(MailError):
    """The server refused the message for good (a 5xx reply): sending it again would fail again."""


class TransientMailError(MailError):
    """The message may go through later: the server was unreachable, slow, busy (4xx) or failed TLS."""


def compose(kind: str, to: str, context: dict, message_id: str, date: datetime | None = None) -> EmailMessage:
    """The email ``kind`` for ``to``: plain text and HTML from ``mail/<kind>.txt`` (which sets the subject) and
    ``mail/<kind>.html``. ``message_id`` is the outbox row's id, so every attempt at one row carries the same
    Message-ID (a duplicate after a crash is then recognisable); ``date`` defaults to now."""
    config = current_app.config
    if not config["MAIL_FROM"]:
        raise RuntimeError("MAIL_FROM must be set to send email.")
    if not MESSAGE_ID_LOCAL_PART.fullmatch(message_id):
        raise ValueError(f"message_id must be letters, digits, '.', '_' or '-', not {message_id!r}")
    context = {"firm_name": config["FIRM_NAME"], **context}
    text = template(f"mail/{kind}.txt").make_module(context)

    message = EmailMessage()
    message["Subject"] = " ".join(str(text.subject).split())  # one line, whatever a name in it holds
    message["From"] = formataddr((config["FIRM_NAME"], config["MAIL_FROM"]))
    message["To"] = to
    if len(message["To"].addresses) != 1:
        raise ValueError(f"One recipient per message, not {to!r}")
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message["Message-ID"] = f"<{message_id}@{config['MAIL_MESSAGE_ID_DOMAIN']}>"
    message.set_content(str(text).lstrip("\n"))
    message.add_alternative(template(f"mail/{kind}.html").render(**context), subtype="html")
    return message


def template(name: str) -> Template:
    """A mail template, rendered strictly: a value the template names and the context lacks is an error, not an
    empty link in someone's inbox. The app's templates and autoescaping (.html only), without its request globals.
    A .txt template sets ``subject``; what it renders is the plain-text body."""
    environment: Environment | None = current_app.extensions.get("mail_templates")
    if environment is None:
        environment = current_app.extensions["mail_templates"] = current_app.jinja_env.overlay(
            undefined=StrictUndefined
        )
    return environment.get_template(name)


def deliver(message: EmailMessage) -> None:
    """Send ``message`` the way MAIL_BACKEND says: smtp, file (an .eml file in MAIL_DIR) or disabled (logged)."""
    backend = current_app.config["MAIL_BACKEND"]
    if backend == "smtp":
        send_by_smtp(message)
    elif backend == "file":
        write_eml(message)
    else:
        log.info("Email disabled (MAIL_BACKEND=disabled): %s to %s not sent", message["Message-ID"], message["To"])


def write_eml(message: EmailMessage) -> Path:
    """Write ``message`` to ``<MAIL_DIR>/<Message-ID's left-hand side>.eml``, whole or not at all: it is written
    aside and renamed into place, so a reader never sees half a message and a second delivery replaces the first."""
    local_part = message["Message-ID"].strip("<>").rpartition("@")[0]
    if not MESSAGE_ID_LOCAL_PART.fullmatch(local_part):
        raise ValueError(f"Message-ID {message['Message-ID']!r} cannot name a file")
    folder = Path(current_app.config["MAIL_DIR"] or os.path.join(current_app.instance_path, "mail"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{local_part}.eml"
    descriptor, draft = tempfile.mkstemp(dir=folder, prefix=f".{local_part}.", suffix=".new")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(message.as_bytes())
        os.replace(draft, path)
    except BaseException:
        Path(draft).unlink(missing_ok=True)
        raise
    log.info("Email to %s written to %s", message["To"], path)
    return path


def send_by_smtp(message: EmailMessage) -> None:
    """Send ``message`` to MAIL_SERVER, protected as MAIL_SECURITY says: each wait bounded by MAIL_TIMEOUT, and all
    that follows the server's greeting by SEND_DEADLINE_TIMEOUTS of them (a server answering a byte at a time is cut
    off then), well within the outbox's lease. Resolving MAIL_SERVER's name is the system resolver's."""
    config = current_app.config
    host, port, timeout, security = (
        config["MAIL_SERVER"],
        config["MAIL_PORT"],
        config["MAIL_TIMEOUT"],
        config["MAIL_SECURITY"],
    )
    where = f"{host}:{port}"
    [recipient] = message["To"].addresses  # compose gives one: a refusal then raises rather than half-sends
    try:
        context = None if security == "none" else ssl.create_default_context(cafile=config["MAIL_CA_FILE"])
        if security == "tls":
            smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
        else:
            smtp = smtplib.SMTP(host, port, timeout=timeout)
    except (OSError, smtplib.SMTPException) as error:  # refused, timed out, TLS failed, a greeting not 220
        raise TransientMailError(f"Connecting to SMTP server {where} failed: {error!r}") from error
    deadline = threading.Timer(timeout * SEND_DEADLINE_TIMEOUTS, hang_up, [smtp])
    deadline.start()
    try:
        if security == "starttls":
            smtp.starttls(context=context)
        if config["MAIL_USERNAME"]:
            smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"] or "")
        smtp.send_message(message, to_addrs=[recipient.addr_spec])
    except smtplib.SMTPAuthenticationError as error:  # our setting, not this message: tried again later
        raise TransientMailError(
            f"{where} refused the login of MAIL_USERNAME {config['MAIL_USERNAME']!r}: {reply(error)}"
        ) from error
    except smtplib.SMTPRecipientsRefused as error:
        code, text = next(iter(error.recipients.values()))
        raise refusal(smtplib.SMTPResponseException(code, text), f"{where} refused {message['To']}") from error
    except smtplib.SMTPDataError as error:  # this message refused, its recipient accepted
        raise refusal(error, f"{where} refused {message['Message-ID']}") from error
    except (OSError, smtplib.SMTPException) as error:  # MAIL FROM or STARTTLS refused, disconnected, timed out
        raise TransientMailError(f"Sending {message['Message-ID']} to {where} failed: {error!r}") from error
    finally:
        deadline.cancel()
        close(smtp)


def hang_up(smtp: smtplib.SMTP) -> None:
    """The deadline passed: end the connection, so that the wait in progress fails at once."""
    if (sock := getattr(smtp, "sock", None)) is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def reply(error: smtplib.SMTPResponseException) -> str:
    text = error.smtp_error.decode(errors="replace") if isinstance(error.smtp_error, bytes) else error.smtp_error
    return f"{error.smtp_code} {text}"


def refusal(error: smtplib.SMTPResponseException, what: str) -> MailError:
    """A refusal of this recipient or this message: a 5xx is final; any other (4xx: busy, greylisted, out of space)
    says try again later. Refusals of our own settings (the login, the sender, STARTTLS) are never final: once the
    settings are put right, the messages waiting go out."""
    kind = PermanentMailError if 500 <= error.smtp_code < 600 else TransientMailError
    return kind(f"{what}: {reply(error)}")


def close(smtp: smtplib.SMTP) -> None:
    """Say QUIT, or just hang up: once the server has accepted the message, nothing that follows is a failure."""
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()
