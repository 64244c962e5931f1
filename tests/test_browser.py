"""A real browser against the real server: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver (`make test` installs both, through `make browser`). Nothing is downloaded at run time."""

import fcntl
import functools
import re
import shutil
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import WebDriverWait

from helpers import DEV_SERVER, ROOT, call, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
PAGES = ROOT / "tests" / "browser"
ANGULAR_ORIGIN_PORT = 4200  # the Angular dev server's origin, which CORS_ORIGIN allows by default
WAIT = 30


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One Chromium for the module's tests: starting it is most of a test's time."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make browser` installs Debian's chromium packages.")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The module's Chromium on a blank page, its console emptied of what earlier tests logged. Nothing else carries
    over: each test's API and pages are on origins (ports) of their own."""
    chromium.get("about:blank")
    chromium.get_log("browser")  # reading the console's messages removes them
    return chromium


@pytest.fixture
def angular_origin():
    """The Angular dev server's port, which CORS_ORIGIN allows by default, is one for the whole machine: a run of the
    suite on the other database (`make test` runs both at once) waits here until this test is done with it."""
    with (Path(tempfile.gettempdir()) / f"finstack-tests-port-{ANGULAR_ORIGIN_PORT}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield ANGULAR_ORIGIN_PORT


@pytest.fixture
def api(servers, environment):
    """`python app.py` on a fresh database, with the default admin; its log records every request line."""
    return servers.start(DEV_SERVER, environment)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def static_site():
    """Serve tests/browser/ on a host and port; every site started is stopped at the end of the test."""
    started = []

    def serve(host: str, port: int) -> str:
        try:
            server = ThreadingHTTPServer((host, port), functools.partial(QuietHandler, directory=str(PAGES)))
        except OSError as error:
            pytest.fail(f"cannot serve the test page on {host}:{port} ({error}); is something else using the port?")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"http://{host}:{port}"

    yield serve
    for server in started:
        server.shutdown()
        server.server_close()


def requests_seen(api) -> list[tuple[str, str, str]]:
    """(method, path, status) of every request the development server logged."""
    return re.findall(r'"(\w+) (\S+) HTTP/1\.1" (\d{3})', api.log.read_text())


def run_client_page(browser, site: str, api) -> list[dict]:
    browser.get(f"{site}/client.html?api={api.url}")
    return browser.execute_async_script("window.finished.then(arguments[0])")


def test_docs_page_authorizes_and_tries_the_task_list(browser, api):
    token = call("POST", f"{api.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1]["access_token"]
    wait = WebDriverWait(browser, WAIT)

    browser.get(f"{api.url}/api/docs")
    operation = wait.until(ready.presence_of_element_located((By.ID, "operations-tasks-tasks_list_tasks")))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) >= 20  # every operation is rendered

    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    dialog = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".auth-container input")))
    dialog.send_keys(token)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.btn-done").click()
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#operations-tasks-tasks_list_tasks .try-out__btn")))
    operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = wait.until(
        ready.visibility_of_element_located(
            (
                By.CSS_SELECTOR,
                "#operations-tasks-tasks_list_tasks .live-responses-table tr.response .response-col_status",
            )
        )
    )

    assert status.text.strip() == "200"
    body = operation.find_element(
        By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description pre"
    ).text
    assert '"pagination"' in body
    assert [path for method, path, _ in requests_seen(api) if method == "GET" and path.startswith("/api/tasks?")]
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]  # no CSP or load errors


def test_a_page_on_the_angular_origin_uses_the_api_through_cors(browser, api, angular_origin, static_site):
    site = static_site("localhost", angular_origin)

    results = run_client_page(browser, site, api)

    assert [(result["step"], result.get("status")) for result in results] == [
        ("login", 200), ("create", 201), ("list", 200), ("patch", 200), ("delete", 200)
    ]  # fmt: skip
    task = results[1]["data"]["task"]
    assert [listed["id"] for listed in results[2]["data"]["tasks"]] == [task["id"]]
    assert results[3]["data"]["task"]["status"] == "closed"
    seen = requests_seen(api)
    for path in ("/api/auth/login", "/api/tasks", f"/api/tasks/{task['id']}/status", f"/api/tasks/{task['id']}"):
        assert ("OPTIONS", path, "200") in seen, path  # the browser asked first, and was allowed
    assert ("DELETE", f"/api/tasks/{task['id']}", "200") in seen


def test_the_same_page_on_another_origin_is_blocked_by_the_browser(browser, api, static_site):
    site = static_site("127.0.0.1", free_port())

    results = run_client_page(browser, site, api)

    assert len(results) == 1
    assert results[0]["step"] == "login"
    assert results[0]["error"].startswith("TypeError")  # fetch refused: the page learns nothing
    console = " ".join(entry["message"] for entry in browser.get_log("browser"))
    assert f"from origin '{site}' has been blocked by CORS policy" in console
    seen = requests_seen(api)
    assert ("OPTIONS", "/api/auth/login", "200") in seen  # the preflight was answered without a grant
    assert not [request for request in seen if request[0] == "POST"]  # so the login itself was never sent
