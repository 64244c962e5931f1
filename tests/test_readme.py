"""The curl examples of README.md and docs/*.md: each file's run in order against a real server on a fresh database,
and none left out (see tests/documentation.py for which blocks run)."""

import re
import subprocess

import pytest
from documentation import DEV_ADDRESS, documentation_files, fenced_blocks

from helpers import DEV_SERVER

EXAMPLE_FILES = [path for path in documentation_files() if any(block.is_run for block in fenced_blocks(path))]
# A command expected to fail says so with a comment naming its status: `curl ... # 401`.
EXPECTED_ERROR = re.compile(r"#\s*[45]\d\d\b")


def flat(output: str) -> str:
    return output.replace(" ", "").replace("\n", "")


def check_readme(output: str) -> None:
    assert '"database":"ok"' in flat(output)
    assert '"tasks":[]' in flat(output) and '"total":0' in flat(output)


def check_api(output: str) -> None:
    assert '"database":"ok"' in flat(output)
    assert "FinStack Tasks API 3.0.3 33 paths" in output
    assert '"status":"ready"' in flat(output)
    assert 'flask_http_request_duration_seconds_count{endpoint="auth.login",method="POST",status="200"} 2.0' in output
    assert output.count('"message":"Registration successful."') == 1
    for expected in (
        "Task updated.", "Task marked closed.", "Status set to open for 1 task(s).", "Task deleted.",
        "Profile updated.", '"phone":"+44 20 7946 0958"', '"time_zone":"Europe/London"', '"is_active":false',
        "Logged out.", "Task restored.",
        '"action":"restored"', '"new_value":"Agenda sent"', "The task has changed since you read it",
    ):  # fmt: skip
        assert expected in output.replace(": ", ":"), expected
    assert '"median_seconds_to_close"' in output and '"entity_names_total":2' in flat(output)
    assert "id,date_created,entity_name,task_type" in output  # the CSV file's header
    assert " ef bb bf\n" in output  # the file for Excel starts with a byte-order mark
    assert '"page":2,"pages":2' in flat(output)  # the page after the cursor
    assert re.search(r"^304$", output, re.MULTILINE)  # the polled page, unchanged
    assert "dashboard 304\n" in output  # the polled dashboard, unchanged
    assert output.count('"refresh_token":') == 2  # registration and the refresh by body print theirs
    first, retry = re.search(r"^first (\S+)\nretry (\S+)$", output, re.MULTILINE).groups()
    assert first == retry  # the retry with the Idempotency-Key got the first task back
    assert "Token has been revoked" in output  # the access token after logout
    assert '"message":"Usercreated."' in flat(output)  # an account made by the administrator
    assert "Request body too large" in output  # the 12 MB upload
    assert "Invitation sent to kim@example.com." in output and "Invitation revoked" in output
    assert output.count("This invitation link is not valid") == 1 and "a new link is on its way" in output


def check_operations(output: str) -> None:
    assert '"status":"ready"' in flat(output)
    assert re.search(r"^flask_http_request_duration_seconds_count\{endpoint=\"health\.ready\"", output, re.MULTILINE)


def check_security(output: str) -> None:
    headers = output.lower()
    assert "x-ratelimit-limit: 10\n" in headers.replace("\r", "")
    assert "x-ratelimit-remaining: 9\n" in headers.replace("\r", "")
    assert "x-frame-options: deny" in headers and "x-content-type-options: nosniff" in headers
    assert "content-security-policy: default-src 'none'; frame-ancestors 'none'" in headers
    assert "referrer-policy: no-referrer" in headers
    assert output.count("Invalid username or password.") == 2  # one sentence for a wrong password and a stranger


# What each file's examples must print, beyond running cleanly with exactly the errors they announce.
CHECKS = {
    "README.md": check_readme,
    "api.md": check_api,
    "operations.md": check_operations,
    "security.md": check_security,
}


def test_every_curl_example_is_run_or_says_why_not():
    blocks = [block for path in documentation_files() for block in fenced_blocks(path)]

    left_out = [block.where() for block in blocks if block.has_curl and not block.is_run and not block.marked_not_run]
    run_anyway = [block.where() for block in blocks if block.is_run and block.marked_not_run]

    assert left_out == [], f"curl examples neither run nor marked <!-- not run: why -->: {left_out}"
    assert run_anyway == [], f"examples marked 'not run' that call {DEV_ADDRESS}: {run_anyway}"
    assert {path.name for path in EXAMPLE_FILES} == set(CHECKS)


def test_a_curl_example_left_out_is_noticed(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\ncurl -s \\\n  http://127.0.0.1:5000/api/health\n```\n\n"  # run: the address on a continuation line
        "```bash\ncurl -s http://127.0.0.1:10000/api/health\n```\n\n"  # left out
        "<!-- not run: needs a Docker engine -->\n```bash\ncurl -s http://127.0.0.1:10000/api/health\n```\n\n"
        "```bash\nmake run    # serves http://127.0.0.1:5000\n```\n"  # no curl: neither run nor an example
    )

    run, left_out, marked, plain = fenced_blocks(page)

    assert run.is_run and not run.marked_not_run
    assert left_out.has_curl and not left_out.is_run and not left_out.marked_not_run
    assert marked.has_curl and marked.marked_not_run and not marked.is_run
    assert not plain.has_curl and not plain.is_run


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_curl_examples_work(path, servers, environment):
    script = "\n".join(block.text for block in fenced_blocks(path) if block.is_run)
    server = servers.start(DEV_SERVER, environment)  # what `make run` starts

    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(DEV_ADDRESS, server.url)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert "Internal server error" not in output
    # Nothing failed but the commands that say they will.
    assert output.count('"error":') == len(EXPECTED_ERROR.findall(script)), output
    CHECKS[path.name](output)
    server.stop()
    assert "Traceback" not in server.log.read_text()
