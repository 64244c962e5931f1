"""mail.py: messages built from the templates, written as .eml files, and sent to a real SMTP server (aiosmtpd)
in plain text, with STARTTLS and with TLS; the server's refusals sorted into permanent and transient failures."""

import email
import email.policy
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
import trustme
from jinja2 import UndefinedError
from smtp_server import SmtpServer
from tcp_proxy import reserve

from config import Config, ConfigError
from mail import SEND_DEADLINE_TIMEOUTS, PermanentMailError, TransientMailError, compose, deliver

RESET = {
    "full_name": "Alice <b>Adams</b> & Co",
    "link": "https://tasks.example.com/reset?token=a&b",
    "expires_in": "valid for 1 hour",
}
FIRM = "Adams, Brown & Co"  # a comma: From quotes the name
ROW_ID = "5f0c6a1e-8d1b-4c1a-9a57-2f7d3c9e0b11"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def password_reset(app, to: str = "alice@example.com", message_id: str = ROW_ID, **context):
    with app.app_context():
        return compose("password_reset", to, RESET | context, message_id)


def send(app, message) -> None:
    with app.app_context():
        deliver(message)


def use_server(app, server: SmtpServer, **settings) -> None:
    app.config.update(
        MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=server.port, MAIL_SECURITY=server.security, **settings
    )


def test_a_name_with_line_breaks_leaves_the_subject_whole_and_one_line(app):  # older names may have them
    invitation = {"inviter_name": "Mallory\nBcc:\rall@example.com", "full_name": None, "is_admin": False}
    invitation |= {"link": "https://x.example/i", "expires_in": "7 days"}
    with app.app_context():
        message = compose("invitation", "kim@example.com", invitation, ROW_ID)

    assert message["Subject"] == "Mallory Bcc: all@example.com invited you to FinStack's task manager"  # one line
    assert message["Bcc"] is None and "all@example.com" not in message["To"]


@pytest.mark.app_config(MAIL_FROM="tasks@finstack.example", MAIL_MESSAGE_ID_DOMAIN="finstack.example", FIRM_NAME=FIRM)
def test_compose_fills_headers_and_both_parts(app):
    date = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    with app.app_context():
        message = compose("password_reset", "alice@example.com", RESET, ROW_ID, date=date)

    assert message["To"] == "alice@example.com"
    [sender] = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Adams, Brown & Co", "tasks@finstack.example")
    assert message["Subject"] == "Reset your Adams, Brown & Co password"
    assert message["Message-ID"] == f"<{ROW_ID}@finstack.example>"
    assert parsedate_to_datetime(message["Date"]) == date
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert text.startswith("Hello Alice <b>Adams</b> & Co,\n")  # plain text is not escaped, and no subject line
    assert "https://tasks.example.com/reset?token=a&b\n" in text
    assert "valid for 1 hour" in text
    assert "Alice &lt;b&gt;Adams&lt;/b&gt; &amp; Co" in html  # HTML is
    assert "<b>Adams" not in html
    assert 'href="https://tasks.example.com/reset?token=a&amp;b"' in html
    assert "valid for 1 hour" in html
    assert "Adams, Brown &amp; Co</td>" in html  # the layout's firm name


def test_message_id_comes_from_the_row_and_the_sender_domain(app):
    first, again = password_reset(app), password_reset(app)

    assert first["Message-ID"] == again["Message-ID"] == f"<{ROW_ID}@localhost>"  # MAIL_FROM is tasks@localhost
    assert first["From"] == "FinStack <tasks@localhost>"


@pytest.mark.parametrize("message_id", ["../escape", "a/b", "x@y", "", "a b"])
def test_compose_refuses_a_message_id_that_cannot_name_a_file(app, message_id):
    with pytest.raises(ValueError, match="message_id must be"):
        password_reset(app, message_id=message_id)


def test_file_backend_writes_a_parseable_eml_in_the_instance_folder(app, caplog):
    message = password_reset(app)
    with caplog.at_level(logging.INFO, logger="mail"):
        send(app, message)

    path = os.path.join(app.instance_path, "mail", f"{ROW_ID}.eml")
    with open(path, "rb") as file:
        parsed = email.message_from_bytes(file.read(), policy=email.policy.default)
    assert (parsed["To"], parsed["Subject"], parsed["Message-ID"]) == (
        "alice@example.com",
        "Reset your FinStack password",
        f"<{ROW_ID}@localhost>",
    )
    assert parsed.get_body(("plain",)).get_content() == message.get_body(("plain",)).get_content()
    assert parsed.get_body(("html",)).get_content() == message.get_body(("html",)).get_content()
    assert [record.getMessage() for record in caplog.records] == [f"Email to alice@example.com written to {path}"]


def test_file_backend_replaces_a_message_sent_again_and_leaves_no_drafts(app, tmp_path):
    app.config["MAIL_DIR"] = str(tmp_path / "outgoing")
    send(app, password_reset(app, full_name="First"))
    send(app, password_reset(app, full_name="Second"))

    assert [path.name for path in (tmp_path / "outgoing").iterdir()] == [f"{ROW_ID}.eml"]
    parsed = email.message_from_bytes(
        (tmp_path / "outgoing" / f"{ROW_ID}.eml").read_bytes(), policy=email.policy.default
    )
    assert "Hello Second," in parsed.get_body(("plain",)).get_content()


@pytest.mark.app_config(MAIL_BACKEND="disabled")
def test_disabled_backend_logs_and_sends_nothing(app, caplog):
    with caplog.at_level(logging.INFO, logger="mail"):
        send(app, password_reset(app))

    assert [record.getMessage() for record in caplog.records] == [
        f"Email disabled (MAIL_BACKEND=disabled): <{ROW_ID}@localhost> to alice@example.com not sent"
    ]
    assert not os.path.exists(os.path.join(app.instance_path, "mail"))


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
def test_smtp_delivers_the_message_as_composed(app, ca, ca_file, security):
    message = password_reset(app)
    with SmtpServer(security, ca=ca) as server:
        use_server(app, server, MAIL_CA_FILE=ca_file)
        send(app, message)

    [received] = server.received
    assert received.encrypted is (security != "none")
    assert (received.mail_from, received.rcpt_tos, received.login) == ("tasks@localhost", ["alice@example.com"], None)
    assert received.message["Message-ID"] == message["Message-ID"]
    for part in ("plain", "html"):  # SMTP carries lines ending in CRLF
        sent = message.get_body((part,)).get_content()
        assert received.message.get_body((part,)).get_content().replace("\r\n", "\n") == sent


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_smtp_logs_in_when_a_username_is_set(app, ca, ca_file, security):
    with SmtpServer(security, ca=ca, login=("mailer", "s3cret")) as server:
        use_server(app, server, MAIL_CA_FILE=ca_file, MAIL_USERNAME="mailer", MAIL_PASSWORD="s3cret")
        send(app, password_reset(app))

    assert [(received.login, received.encrypted) for received in server.received] == [("mailer", True)]


def test_smtp_wrong_password_is_transient_a_setting_to_put_right_not_a_bad_message(app, ca, ca_file):
    with SmtpServer("starttls", ca=ca, login=("mailer", "s3cret")) as server:
        use_server(app, server, MAIL_CA_FILE=ca_file, MAIL_USERNAME="mailer", MAIL_PASSWORD="wrong")
        with pytest.raises(TransientMailError, match=r"refused the login of MAIL_USERNAME 'mailer': 535 "):
            send(app, password_reset(app))

    assert server.received == []


@pytest.mark.parametrize(
    ("where", "reply", "error"),
    [
        ("rcpt", "550 5.1.1 No such user", PermanentMailError),
        ("rcpt", "451 4.3.0 Try again later", TransientMailError),
        ("data", "554 5.6.0 Message refused", PermanentMailError),
        ("data", "451 4.3.0 Out of space", TransientMailError),
    ],
)
def test_smtp_refusals_are_permanent_for_5xx_and_transient_for_4xx(app, where, reply, error):
    with SmtpServer("none") as server:
        setattr(server, f"{where}_reply", reply)
        use_server(app, server)
        with pytest.raises(error, match=reply.split()[0]) as raised:
            send(app, password_reset(app))

    assert reply.partition(" ")[2] in str(raised.value)
    assert server.received == []


def test_smtp_closed_port_is_transient(app):
    closed = reserve()  # bound, not listening: connections are refused
    try:
        app.config.update(MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=closed.getsockname()[1])
        with pytest.raises(TransientMailError, match=r"Connecting to SMTP server .* failed: ConnectionRefusedError"):
            send(app, password_reset(app))
    finally:
        closed.close()


def test_smtp_server_that_never_answers_is_transient_after_mail_timeout(app):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections wait in its backlog, greeted by no one
        app.config.update(
            MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=silent.getsockname()[1], MAIL_TIMEOUT=0.2
        )
        started = time.monotonic()
        with pytest.raises(TransientMailError, match=r"Connecting to SMTP server .* failed: .*timed out"):
            send(app, password_reset(app))

    assert 0.2 <= time.monotonic() - started < 2


def test_smtp_server_answering_a_byte_at_a_time_is_cut_off_at_the_deadline(app):
    """Each byte comes within MAIL_TIMEOUT, so only the deadline over the whole sending ends it."""
    stop = threading.Event()

    def drip(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b"220 slow.example ESMTP\r\n")
            connection.recv(1024)  # EHLO
            while not stop.wait(0.05):
                try:
                    connection.sendall(b"2")  # "250 ..." that never ends
                except OSError:
                    return

    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=drip, args=(listener,), daemon=True)
        server.start()
        app.config.update(
            MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=listener.getsockname()[1], MAIL_TIMEOUT=0.2,
            MAIL_SECURITY="none",
        )  # fmt: skip
        started = time.monotonic()
        with pytest.raises(TransientMailError, match="failed"):
            send(app, password_reset(app))
        took = time.monotonic() - started
        stop.set()
        server.join(5)

    assert 0.2 * SEND_DEADLINE_TIMEOUTS <= took < 0.2 * SEND_DEADLINE_TIMEOUTS + 1


def test_a_message_has_one_recipient(app):
    with pytest.raises(ValueError, match="One recipient per message"):
        password_reset(app, to="alice@example.com, mallory@evil.example")


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_smtp_certificate_from_an_untrusted_ca_is_transient(app, ca, ca_file, security):
    with SmtpServer(security, ca=trustme.CA()) as server:  # not the CA that MAIL_CA_FILE trusts
        use_server(app, server, MAIL_CA_FILE=ca_file)
        with pytest.raises(TransientMailError, match="CERTIFICATE_VERIFY_FAILED"):
            send(app, password_reset(app))

    assert server.received == []


def test_smtp_without_mail_ca_file_trusts_only_the_system_cas(app, ca):
    with SmtpServer("starttls", ca=ca) as server:
        use_server(app, server)
        with pytest.raises(TransientMailError, match="CERTIFICATE_VERIFY_FAILED"):
            send(app, password_reset(app))


def test_mail_settings_default_to_files_in_development_and_smtp_in_production():
    development, production = Config({}), Config({"APP_ENV": "production"})

    assert (development.MAIL_BACKEND, production.MAIL_BACKEND) == ("file", "smtp")
    assert (development.MAIL_SECURITY, development.MAIL_PORT, development.MAIL_TIMEOUT) == ("starttls", 587, 10.0)
    assert (development.MAIL_FROM, development.MAIL_MESSAGE_ID_DOMAIN) == ("tasks@localhost", "localhost")
    assert (production.MAIL_FROM, production.MAIL_MESSAGE_ID_DOMAIN) == (None, None)
    assert (development.MAIL_DIR, development.FIRM_NAME, development.MAIL_CA_FILE) == (None, "FinStack", None)


def test_mail_settings_follow_the_environment(ca_file):
    config = Config(
        {
            "MAIL_SECURITY": "TLS",
            "MAIL_FROM": "tasks@Mail.Adams.example",
            "MAIL_TIMEOUT": "2.5",
            "MAIL_CA_FILE": ca_file,
            "FIRM_NAME": "Adams & Co",
        }
    )

    assert (config.MAIL_SECURITY, config.MAIL_PORT, config.MAIL_TIMEOUT) == ("tls", 465, 2.5)
    assert (
        "mail.adams.example",
        ca_file,
        "Adams & Co",
    ) == (config.MAIL_MESSAGE_ID_DOMAIN, config.MAIL_CA_FILE, config.FIRM_NAME)
    assert Config({"MAIL_SECURITY": "none"}).MAIL_PORT == 25
    assert Config({"MAIL_PORT": "2525", "MAIL_MESSAGE_ID_DOMAIN": "ids.example"}).MAIL_PORT == 2525
    assert Config({"MAIL_MESSAGE_ID_DOMAIN": "ids.example"}).MAIL_MESSAGE_ID_DOMAIN == "ids.example"


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"MAIL_BACKEND": "sendmail"}, "MAIL_BACKEND must be file, smtp, disabled, not 'sendmail'"),
        ({"MAIL_SECURITY": "ssl"}, r"MAIL_SECURITY must be starttls \(port 587\), tls \(port 465\) or none"),
        ({"MAIL_PORT": "0"}, "MAIL_PORT must be a port number from 1 to 65535, not '0'"),
        ({"MAIL_PORT": "smtp"}, "MAIL_PORT must be a port number"),
        ({"MAIL_TIMEOUT": "0"}, "MAIL_TIMEOUT must be a positive number of seconds"),
        ({"MAIL_TIMEOUT": "-1"}, "MAIL_TIMEOUT must be a positive number of seconds"),
        ({"MAIL_TIMEOUT": "ten"}, "MAIL_TIMEOUT must be a positive number of seconds"),
        ({"MAIL_TIMEOUT": "inf"}, "MAIL_TIMEOUT must be a positive number of seconds"),
        ({"MAIL_TIMEOUT": "nan"}, "MAIL_TIMEOUT must be a positive number of seconds"),
        ({"MAIL_FROM": "FinStack <tasks@example.com>"}, "MAIL_FROM must be a bare email address"),
        ({"MAIL_FROM": "tasks"}, "MAIL_FROM must be a bare email address"),
        ({"MAIL_MESSAGE_ID_DOMAIN": "not a domain"}, "MAIL_MESSAGE_ID_DOMAIN .* must be a domain"),
        ({"MAIL_CA_FILE": "/nonexistent/ca.pem"}, "MAIL_CA_FILE must be a PEM file of CA certificates"),
        (
            {"MAIL_SECURITY": "none", "MAIL_USERNAME": "mailer"},
            "MAIL_USERNAME is set with MAIL_SECURITY=none, which would send the password unencrypted",
        ),
    ],
)
def test_mail_settings_refuse_bad_values(environment, message):
    with pytest.raises(ConfigError, match=message):
        Config(environment)


def test_mail_ca_file_of_no_certificates_is_refused(tmp_path):
    (tmp_path / "empty.pem").write_text("not a certificate\n")

    with pytest.raises(ConfigError, match="MAIL_CA_FILE must be a PEM file"):
        Config({"MAIL_CA_FILE": str(tmp_path / "empty.pem")})


def test_a_value_missing_from_the_context_is_an_error_not_an_empty_link(app):
    without_link = {"full_name": "Alice", "expires_in": "valid for 1 hour"}
    with app.app_context(), pytest.raises(UndefinedError, match="link"):
        compose("password_reset", "alice@example.com", without_link, ROW_ID)
