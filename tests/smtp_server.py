"""A real SMTP server for the mail tests: aiosmtpd on 127.0.0.1, in a thread of its own, keeping what it receives.
It speaks plain SMTP, STARTTLS or implicit TLS with a certificate from a test certificate authority (trustme), can
demand a login, and can be told to refuse recipients or messages with any reply (550 for good, 451 for now)."""

import email
import email.policy
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from helpers import free_port

SECURITY_MODES = ("none", "starttls", "tls")


@dataclass
class Received:
    """One message as the server took it: the envelope, the message parsed back, and how it came."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    encrypted: bool
    login: str | None


class SmtpServer:
    """``SmtpServer(security, ca=..., login=(user, password))``: listening once built; use it as a context manager.

    - ``received``: the messages accepted so far, in order.
    - ``rcpt_reply`` / ``data_reply``: set to a reply such as ``"550 5.1.1 No such user"`` or
      ``"451 4.3.0 Try again later"`` to answer RCPT TO or DATA with it instead of accepting.
    - ``during_data``: a function called as a message's DATA arrives, before the reply (something happening meanwhile,
      such as another sender's claim while this one is slow)."""

    def __init__(self, security: str = "none", ca: trustme.CA | None = None, login: tuple[str, str] | None = None):
        if security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {SECURITY_MODES}")
        self.security = security
        self.received: list[Received] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.during_data: Callable[[], None] | None = None
        self._login = login
        options = {}
        if security != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            (ca or trustme.CA()).issue_cert("127.0.0.1", "localhost").configure_cert(context)
            options = {"tls_context": context, "require_starttls": True} if security == "starttls" else {}
            if security == "tls":
                # Implicit TLS: aiosmtpd offers AUTH only after its own STARTTLS unless told the line is encrypted.
                options = {"ssl_context": context, "auth_require_tls": False}
        if login:
            # Mail without a login is refused, except under implicit TLS, where aiosmtpd would warn that AUTH is
            # required without TLS (it only counts its own STARTTLS): the tests check who logged in anyway.
            options |= {"authenticator": self._authenticate, "auth_required": security != "tls"}
        # aiosmtpd cannot listen on port 0 (it connects to the port it was given to check it is up): pick one first.
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, ready_timeout=5, **options)
        self._controller.start()

    def __enter__(self) -> "SmtpServer":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._controller.stop()

    def _authenticate(self, _server, _session, _envelope, _mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        given = (auth_data.login.decode(), auth_data.password.decode())
        return AuthResult(success=given == self._login, handled=False, auth_data=auth_data)

    async def handle_RCPT(self, _server, _session, envelope, address, _options) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.during_data:
            self.during_data()
        if self.data_reply:
            return self.data_reply
        raw = envelope.original_content
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                message=email.message_from_bytes(raw, policy=email.policy.default),
                raw=raw,
                encrypted=server.transport.get_extra_info("ssl_object") is not None,
                login=session.login_data.decode() if session.login_data else None,
            )
        )
        return "250 OK"
