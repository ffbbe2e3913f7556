"""
The dashboard in a real headless browser: Debian's chromium, driven by
Selenium through chromium-driver, against the proxy and the fake Z.AI on
loopback. The page loads with no console error, draws its panels, shows
the same per-client numbers as C{/api/usage}, shows a new request within
two seconds without a reload, and its login works.

A screenshot of each page is saved under C{test-artifacts/} (or
C{$ZAIPROXY_ARTIFACTS}) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait
from support.clients import ANTHROPIC
from support.stack import Stack
from twisted.internet import threads
from twisted.web.http_headers import Headers

T = TypeVar("T")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
TOKEN = "admin-token-0123456789"
PANELS = ["requests", "latency", "tokens", "cost", "concurrency", "limiter", "errors"]

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


async def inThread(f: Callable[[], T]) -> T:
    return await threads.deferToThread(f)


def artifacts() -> Path:
    folder = Path(os.environ.get("ZAIPROXY_ARTIFACTS", "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest_twisted.async_yield_fixture
async def browser() -> AsyncIterator[webdriver.Chrome]:
    """
    A headless chromium, closed after the test.
    """
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = await inThread(lambda: webdriver.Chrome(options=options, service=Service(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        await inThread(driver.quit)


def ledgerEnv(tmp_path: Path, **more: str) -> dict[str, str]:
    return {
        "LEDGER_ENABLED": "true",
        "LEDGER_URL": f"sqlite:///{tmp_path}/ledger.sqlite3",
        "DASHBOARD_INTERVAL": "0.5",
        "PROXY_API_KEYS": f"alice:{ALICE},bob:{BOB}",
        **more,
    }


async def message(stack: Stack, key: str) -> str:
    headers = Headers({k: [v] for k, v in ANTHROPIC})
    headers.setRawHeaders(b"x-api-key", [key.encode()])
    response = await treq.post(
        stack.url("/v1/messages"),
        b'{"model":"glm-4.7","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}',
        headers=headers,
        persistent=False,
    )
    await response.content()
    assert response.code == 200
    [requestId] = response.headers.getRawHeaders(b"x-zaiproxy-request-id")
    return str(requestId.decode())


def waitFor(driver: webdriver.Chrome, seconds: float, check: Callable[[webdriver.Chrome], Any]) -> Any:
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(check)


def consoleErrors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [entry for entry in entries if entry["level"] == "SEVERE"]


def tableValues(driver: webdriver.Chrome, table: str, key: str) -> dict[str, list[float]]:
    """
    A usage table's rows: each row's key and its cells' raw numbers.
    """
    found: dict[str, list[float]] = {}
    for row in driver.find_elements(By.CSS_SELECTOR, f"#{table} tr[data-{key}]"):
        cells = row.find_elements(By.CSS_SELECTOR, "td[data-value]")
        found[row.get_attribute(f"data-{key}") or ""] = [
            float(c.get_attribute("data-value") or "nan") for c in cells
        ]
    return found


@pytest_twisted.ensureDeferred
async def test_dashboardLiveAndTrue(
    reactor: Any, makeStack: Any, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """
    The page draws its seven panels, its client table equals /api/usage,
    and a new request shows up within two seconds, with no console error.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path))
    for key in (ALICE, BOB, BOB):
        await message(stack, key)

    def load() -> None:
        browser.get(stack.url("/dashboard"))
        waitFor(
            browser,
            10,
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#clients-table tr[data-client]")) == 2,
        )
        drawn = ", ".join(f"#panel-{panel} canvas" for panel in PANELS)
        waitFor(browser, 5, lambda d: len(d.find_elements(By.CSS_SELECTOR, drawn)) >= len(PANELS))

    await inThread(load)
    now = reactor.seconds()
    response = await treq.get(
        stack.url(f"/api/usage?group_by=client&from={now - 3600}&to={now}"), persistent=False
    )
    usage = json.loads(await response.content())
    shown = await inThread(lambda: tableValues(browser, "clients-table", "client"))
    expected = {
        row["client"]: [
            row["requests"],
            row["errors"],
            row["input_tokens"],
            row["output_tokens"],
            row["cache_read_tokens"],
            row["cache_write_tokens"],
            row["cost_usd"],
        ]
        for row in usage["rows"]
    }
    assert shown == expected
    requestId = await message(stack, ALICE)
    selector = f'#requests-table tr[data-request-id="{requestId}"]'
    try:
        await inThread(lambda: waitFor(browser, 2.0, lambda d: d.find_elements(By.CSS_SELECTOR, selector)))
    except TimeoutException:
        pytest.fail("a new request did not appear on the page within 2 s")
    await inThread(lambda: browser.save_screenshot(str(artifacts() / "dashboard.png")))
    assert await inThread(lambda: consoleErrors(browser)) == []


@pytest_twisted.ensureDeferred
async def test_loginWithTheAdminToken(makeStack: Any, browser: webdriver.Chrome, tmp_path: Path) -> None:
    """
    With ADMIN_TOKEN set the page asks for it once, then works on its
    session cookie.
    """
    stack = await makeStack("events=1", **ledgerEnv(tmp_path, ADMIN_TOKEN=TOKEN))
    await message(stack, ALICE)

    def login() -> None:
        browser.get(stack.url("/dashboard"))
        field = waitFor(browser, 5, lambda d: d.find_element(By.ID, "token"))
        browser.save_screenshot(str(artifacts() / "dashboard-login.png"))
        field.send_keys("wrong")
        field.submit()
        waitFor(browser, 5, lambda d: "That is not the admin token." in d.page_source)
        field = browser.find_element(By.ID, "token")
        field.clear()
        field.send_keys(TOKEN)
        field.submit()
        waitFor(browser, 10, lambda d: d.find_elements(By.CSS_SELECTOR, "#clients-table tr[data-client]"))

    await inThread(login)
    shown = await inThread(lambda: tableValues(browser, "clients-table", "client"))
    assert list(shown) == ["alice"] and shown["alice"][0] == 1
    errors = await inThread(lambda: consoleErrors(browser))
    # The wrong token's 401 page is the only failed load the console saw.
    assert [e for e in errors if "401" not in e["message"]] == []
