"""Background work: sending what the outbox holds. ``send_message`` sends one message, once, whoever calls it and
however often; ``sweep`` hands every due message to a sender (messages whose hand-over at commit was lost, and
retries whose backoff has passed). Everything else here only decides where those two run:

- With CELERY_BROKER_URL (production), a commit that queued messages hands each one to the Celery workers through
  the broker (``send_message_task``), and Celery beat runs ``sweep_outbox_task`` every SWEEP_INTERVAL; the Celery
  app is built from ``create_app`` as Flask's Celery pattern shows (``celery_init_app``; ``celery_app.py``).
- Without one (``make run``, development), the same happens in the app's own process: after the commit, in a
  thread of its own, and the sweep in another (``EmbeddedRunner``).

Either way the database is the truth: a hand-over that fails (the broker down, the process killed) loses nothing,
as the sweep finds the message due."""

import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from celery import Celery, Task, shared_task
from celery.signals import beat_init, setup_logging, worker_process_init
from flask import Flask, current_app, has_app_context
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

import mail
import outbox
from models import db, utcnow

# How often the sweep runs (Celery beat, or the embedded runner's thread): the longest a message waits when the broker
# refused it at commit, or after its backoff or a dead sender's lease; and the granularity of retries' backoff.
SWEEP_INTERVAL = 60.0
log = logging.getLogger(__name__)


def send_message(message_id) -> str | None:
    """Claim the message, send it, and mark it sent or failed: its state afterwards, or None if it was not due (sent,
    failed, waiting for its next attempt, or being sent by another sender). The claim commits before the sending
    starts, so that no one else sends it meanwhile, and the mark commits after it ends."""
    message = outbox.claim(message_id, utcnow())
    if message is None:
        # Whatever brought it here is spent: if it is not due yet by this host's clock (one behind the clock that
        # queued it, say), the sweep hands it over again once it is, instead of after HAND_OVER_AGAIN_AFTER.
        outbox.handed_over([message_id], None)
        db.session.commit()
        return None
    # Kept out of the session, the message keeps the claim as it was made (its lease above all) through the commit
    # and any rollback below: reloaded, it could show another sender's claim, made after this one's lease ran out,
    # and the mark would then end that one.
    db.session.expunge(message)
    db.session.commit()
    log = {"extra": {"outbox_id": str(message.id), "kind": message.kind}}
    try:
        if current_app.config["MAIL_BACKEND"] == "disabled":
            current_app.logger.info(
                "Email disabled (MAIL_BACKEND=disabled): outbox message %s dropped", message.id, **log
            )
        else:
            mail.deliver(mail.compose(message.kind, message.recipient, message.payload, str(message.id)))
    except mail.PermanentMailError as error:
        db.session.rollback()
        marked = outbox.mark_failed(message, str(error), utcnow(), permanent=True)
        current_app.logger.error("Outbox message %s refused for good: %s", message.id, error, **log)
    except Exception as error:  # a transient failure, or a bug: tried again after the backoff, then parked
        db.session.rollback()  # whatever failed may have left the transaction unusable (PostgreSQL)
        marked = outbox.mark_failed(message, f"{type(error).__name__}: {error}", utcnow())
        current_app.logger.warning(
            "Outbox message %s not sent (attempt %d): %s", message.id, message.attempts, error, **log
        )
    else:
        marked = outbox.mark_sent(message, utcnow())
        current_app.logger.info("Outbox message %s sent", message.id, **log)
    state = marked.state
    db.session.commit()
    return state


def sweep(send: Callable[[object], object] = send_message, batch_size: int = 100) -> int:
    """Park the messages whose senders kept dying, then hand each message due now that no sender holds to ``send``
    (``send_message`` itself, or a function queuing it for a worker), ``batch_size`` at a time until none is left: how
    many were handed. Each due message is read once, in order, however many there are. A message is noted as handed
    over in the transaction that selects it (``outbox.handed_over``), so that two sweeps at once split the work and
    the next sweep leaves it to its sender; one that could not be handed over is the next sweep's again. A message
    also queued by its commit is harmless: only one claim of it succeeds."""
    outbox.park_abandoned(utcnow())
    db.session.commit()
    handed, after = 0, None
    while True:
        now = utcnow()
        batch = outbox.due(now, batch_size, after)
        message_ids = [message_id for message_id, _ in batch]
        outbox.handed_over(message_ids, now)
        db.session.commit()  # releases the rows the selection locked
        kept = [message_id for message_id in message_ids if not hand_to(send, message_id)]
        handed += len(batch) - len(kept)
        if kept:  # the broker away, say: the rest waits for the next sweep
            outbox.handed_over(kept, None)
            db.session.commit()
        if kept or len(batch) < batch_size:
            return handed
        after = batch[-1]


def hand_to(send: Callable[[object], object], message_id) -> bool:
    """``send(message_id)``: whether it took the message (an error is logged, and leaves the message due)."""
    try:
        send(message_id)
    except Exception:
        db.session.rollback()
        current_app.logger.exception("Outbox message %s could not be handed over", message_id)
        return False
    return True


@shared_task(name="outbox.send", ignore_result=True)
def send_message_task(message_id: str) -> None:
    """Celery: send one queued message (``send_message``: a second delivery of this task is harmless)."""
    send_message(uuid.UUID(message_id))


@shared_task(name="outbox.sweep", ignore_result=True)
def sweep_outbox_task() -> None:
    """Celery beat, every SWEEP_INTERVAL: hand every due message to the workers."""
    sweep(send=lambda message_id: send_message_task.apply_async((str(message_id),), retry=False))


def celery_init_app(app: Flask) -> Celery:
    """The Celery app of ``app``, as Flask's Celery pattern builds it: every task runs in an app context, with the
    settings of ``app.config["CELERY"]`` (config.celery_settings)."""

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    celery.config_from_object(app.config["CELERY"])
    celery.conf.beat_schedule = {"sweep-outbox": {"task": "outbox.sweep", "schedule": SWEEP_INTERVAL}}
    celery.set_default()
    app.extensions["celery"] = celery
    return celery


@setup_logging.connect
def app_logging_only(**_kwargs) -> None:
    """Celery leaves logging as create_app set it (LOG_LEVEL, LOG_FORMAT: JSON in production) rather than put its
    own handler and level on the root logger: a receiver of this signal is Celery's documented way to say so."""


@beat_init.connect
def sweep_as_beat_starts(sender, **_kwargs) -> None:
    """Beat's first sweep as it starts, not a minute later: after a deploy or an outage, whatever is due goes now."""
    sender.app.send_task("outbox.sweep")


@worker_process_init.connect
def own_connections(**_kwargs) -> None:
    """A prefork worker's child must not share its parent's database connections: it opens its own."""
    from celery import current_app as celery

    flask_app = getattr(celery, "flask_app", None)
    if flask_app is not None:
        with flask_app.app_context():
            db.engine.dispose(close=False)


class Runner:
    """Hands the messages a commit queued to whoever sends them, from a thread of this process's own, so that the
    request that queued them answers without waiting (started on first use in each process: a thread does not
    survive a fork). Messages not handed over when the process dies are the sweep's: at once without a broker; with
    one, after outbox.HAND_OVER_AGAIN_AFTER, as they were noted handed over as they were queued."""

    publishes = False  # to a broker, at commit (outbox.published_at_commit)

    def __init__(self, app: Flask):
        self.app = app
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.thread: ThreadPoolExecutor | None = None
        self.stopping: threading.Event | None = None

    def hand_over(self, message_ids: list) -> None:
        self.start().submit(self.run, self.send_all, message_ids)

    def start(self) -> ThreadPoolExecutor:
        if self.pid != os.getpid():
            with self.lock:
                if self.pid != os.getpid():
                    self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finstack-jobs")
                    self.stopping = threading.Event()
                    self.started()
                    self.pid = os.getpid()
        return self.thread

    def started(self) -> None:
        """A new process's thread is ready (the embedded runner starts its sweep here)."""

    def send_all(self, message_ids: list) -> None:
        raise NotImplementedError

    def run(self, job: Callable, *args, **kwargs) -> None:
        with self.app.app_context():
            try:
                job(*args, **kwargs)
            except Exception:  # the database or the broker away, say: the sweep tries again
                db.session.rollback()
                log.exception("Background job %s failed", getattr(job, "__name__", job))

    def stop(self) -> None:
        """End this process's threads once what was handed over is done (tests: a thread left running would use the
        next test's database; a process that exits simply drops them)."""
        if self.pid == os.getpid():
            self.stopping.set()
            self.thread.shutdown(wait=True)
            self.pid = None

    def wait(self) -> None:
        """Until everything handed over so far is done (tests; one thread, so a no-op job runs after all of it)."""
        if self.pid == os.getpid():
            self.thread.submit(lambda: None).result()


class CeleryRunner(Runner):
    """Production: each message goes to the Celery workers through the broker. A broker that cannot take it now
    loses nothing: the message waits in the outbox for the sweep."""

    publishes = True  # outbox.add notes each message as handed over as it queues it

    def send_all(self, message_ids: list) -> None:
        kept = [message_id for message_id in message_ids if not self.publish(message_id)]
        if kept:  # the sweep's, then
            outbox.handed_over(kept, None)
            db.session.commit()

    def publish(self, message_id) -> bool:
        try:
            self.app.extensions["celery"].send_task("outbox.send", (str(message_id),), retry=False)
        except Exception as error:
            log.warning(
                "Outbox message %s not handed to the workers (%s): the sweep will send it",
                message_id,
                error,
                extra={"outbox_id": str(message_id)},
            )
            return False
        return True


class EmbeddedRunner(Runner):
    """No broker (``make run``): this process sends the messages itself, one at a time in its thread, and another
    thread sweeps every SWEEP_INTERVAL."""

    def __init__(self, app: Flask, sweep_interval: float = SWEEP_INTERVAL):
        super().__init__(app)
        self.sweep_interval = sweep_interval

    def send_all(self, message_ids: list) -> None:
        for message_id in message_ids:
            self.run(send_message, message_id)

    def started(self) -> None:
        """A sweep now (what an earlier run left), then one every SWEEP_INTERVAL, each in the jobs' thread: one
        thread does all of this process's sending."""
        self.thread.submit(self.run, self.sweep)
        threading.Thread(target=self.sweep_every_interval, name="finstack-sweep", daemon=True).start()

    def sweep(self) -> None:
        sweep(send=lambda message_id: self.hand_over([message_id]))

    def sweep_every_interval(self) -> None:
        stopping, thread = self.stopping, self.thread
        while not stopping.wait(self.sweep_interval):
            try:
                thread.submit(self.run, self.sweep)
            except RuntimeError:  # stopped meanwhile
                return


def init_jobs(app: Flask) -> None:
    """Build the Celery app, and choose who sends what a commit queues: Celery's workers when a broker is set, this
    process's own threads otherwise (``JOBS_AFTER_COMMIT`` false: nobody, and the tests deliver themselves)."""
    celery = celery_init_app(app)
    celery.flask_app = app
    app.extensions["jobs"] = CeleryRunner(app) if app.config["CELERY"]["broker_url"] else EmbeddedRunner(app)


def hand_over_after_commit(session: Session) -> None:
    """A commit that queued messages hands them to the app's runner. (SQLAlchemy also calls this as a savepoint is
    released: its messages wait for the transaction's own commit, as no sender could see them before.)"""
    if session.in_nested_transaction():
        return
    queued = session.info.pop(outbox.QUEUED, None)
    if queued and has_app_context() and current_app.config.get("JOBS_AFTER_COMMIT", True):
        current_app.extensions["jobs"].hand_over(queued)


def forget_rolled_back_messages(session: Session, previous: SessionTransaction) -> None:
    """A rolled-back transaction queued nothing. (A savepoint's rollback keeps the ids: handing over a message that
    does not exist is harmless, as no claim of it succeeds.)"""
    if previous.parent is None and not previous.nested:
        session.info.pop(outbox.QUEUED, None)


for _event, _listener in (
    ("after_commit", hand_over_after_commit),
    ("after_soft_rollback", forget_rolled_back_messages),
):
    if not event.contains(Session, _event, _listener):  # every session: the app's, the CLI's, the tests'
        event.listen(Session, _event, _listener)
