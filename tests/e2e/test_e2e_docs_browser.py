"""/docs and /redoc in a real headless Chromium against a live `seqguard serve`: the pages
render every operation from assets the service serves itself, Swagger UI posts an event
(stored in Redis), and the browser asks nothing of any host but the service's loopback
address. Chromium cannot resolve any other name here (``--host-resolver-rules``), and its
network log is checked as well.

Needs Debian's ``chromium`` and ``chromium-driver`` (skipped, saying so, without them).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .e2e_support import LiveServer, window_len

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)")

OPERATIONS = {("POST", "/events"), ("POST", "/batch-score"), ("GET", "/healthz"), ("GET", "/readyz"),
              ("GET", "/model"), ("GET", "/users/{user_id}/window"), ("DELETE", "/users/{user_id}"),
              ("POST", "/admin/model")}
WAIT_S = 60  # generous: two shared cores, a cold browser


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--no-proxy-server", f"--user-data-dir={tmp_path / 'chromium'}",
                # Nothing but loopback resolves: a page that needs a CDN cannot render.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: object) -> list[str]:
    """Every network URL (http, https, ws, wss) the browser asked for since the last call,
    from Chrome's network log: its own chrome:// pages are not network requests, and a
    request the page's Content-Security-Policy blocked never left the browser."""
    asked: dict[str, str] = {}
    blocked = set()
    for entry in driver.get_log("performance"):  # type: ignore[attr-defined]
        msg = json.loads(entry["message"])["message"]
        params = msg["params"]
        if msg["method"] == "Network.requestWillBeSent":
            asked[params["requestId"]] = params["request"]["url"]
        elif msg["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    return [url for rid, url in asked.items() if rid not in blocked
            and not url.startswith(("chrome:", "chrome-untrusted:", "data:", "blob:", "about:"))]


def test_swagger_ui_renders_and_posts_an_event_offline(live_server: Callable[..., LiveServer], redis_url: str,
                                                       browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = live_server(redis_url)
    driver = browser
    wait = WebDriverWait(driver, WAIT_S)
    driver.get(server.url + "/docs")  # type: ignore[attr-defined]
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(OPERATIONS))
    shown = {(b.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
              b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text)
             for b in driver.find_elements(By.CSS_SELECTOR, ".opblock")}  # type: ignore[attr-defined]
    assert shown == OPERATIONS
    assert not driver.find_elements(By.CSS_SELECTOR, ".errors-wrapper")  # type: ignore[attr-defined]

    # Post the documented example event, as a person would: open, try it out, execute.
    block = driver.find_element(By.ID, "operations-scoring-post_events_events_post")  # type: ignore[attr-defined]
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#operations-scoring-post_events_events_post "
                                                            ".try-out__btn"))).click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#operations-scoring-post_events_events_post "
                                                            ".execute"))).click()
    status = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "#operations-scoring-post_events_events_post .live-responses-table tr.response "
                          ".response-col_status")))
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description pre")
    assert status.text.strip().startswith("200"), (status.text, body.text)
    assert '"anomaly_probability"' in body.text
    assert window_len(redis_url, "u-42") == 1  # the example's user: stored for real

    urls = requested_urls(driver)
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("/openapi.json") for u in urls), urls
    assert any(u.startswith(server.url + "/events?") for u in urls), urls
    off = [u for u in urls if not u.startswith(server.url + "/")]
    assert off == [], off


def test_redoc_renders_offline(live_server: Callable[..., LiveServer], redis_url: str, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = live_server(redis_url)
    driver = browser
    driver.get(server.url + "/redoc")  # type: ignore[attr-defined]
    # ReDoc lists each operation in its side menu; "/batch-score" appears once rendered.
    WebDriverWait(driver, WAIT_S).until(
        lambda d: "/batch-score" in d.find_element(By.TAG_NAME, "body").text)
    text = driver.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    for summary in ("Post Events", "Batch Score", "Model Info", "Healthz", "Readyz"):
        assert summary in text, summary
    assert "Something went wrong" not in text
    urls = requested_urls(driver)
    assert any(u.endswith("/docs/assets/redoc.standalone.js") for u in urls), urls
    off = [u for u in urls if not u.startswith(server.url + "/")]
    assert off == [], off
