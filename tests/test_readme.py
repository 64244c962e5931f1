"""The README's curl examples, run in order against a real server on a fresh database."""

import re
import subprocess

from helpers import DEV_SERVER, ROOT

README = (ROOT / "README.md").read_text()
EXAMPLES = README.split("### By example", 1)[1].split("## PostgreSQL", 1)[0]


def test_readme_curl_examples_work(servers, environment):
    script = "\n".join(re.findall(r"```bash\n(.*?)```", EXAMPLES, re.DOTALL))
    server = servers.start(DEV_SERVER, environment)  # what `make run` starts

    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("http://127.0.0.1:5000", server.url)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert '"database":"ok"' in output.replace(" ", "")
    assert "FinStack Tasks API 3.0.3 22 paths" in output
    assert '"status":"ready"' in output.replace(" ", "")
    assert 'flask_http_request_duration_seconds_count{endpoint="auth.login",method="POST",status="200"} 2.0' in output
    assert output.count('"message":"Registration successful."') == 1
    for expected in (
        "Task updated.", "Task marked closed.", "Status set to open for 1 task(s).", "Task deleted.",
        "Profile updated.", '"phone":"+44 20 7946 0958"', '"is_active":false', "Logged out.", "Task restored.",
        '"action":"restored"', '"new_value":"Agenda sent"', "The task has changed since you read it",
    ):  # fmt: skip
        assert expected in output.replace(": ", ":"), expected
    assert '"median_seconds_to_close"' in output and '"entity_names_total":2' in output.replace(" ", "")
    assert "id,date_created,entity_name,task_type" in output  # the CSV file's header
    assert '"page":2,"pages":2' in output.replace(" ", "").replace("\n", "")  # the page after the cursor
    assert output.count('"refresh_token":') == 2  # registration and the refresh by body print theirs
    assert "Internal server error" not in output
    first, retry = re.search(r"^first (\S+)\nretry (\S+)$", output, re.MULTILINE).groups()
    assert first == retry  # the retry with the Idempotency-Key got the first task back
    # The revoked token after logout and the five error examples: nothing else failed.
    assert output.count('"error":') == 6
    assert "Token has been revoked" in output
    server.stop()
    assert "Traceback" not in server.log.read_text()
