"""Real headless Chromium for the page tests: Debian's ``chromium`` and ``chromium-driver`` packages (which
``setup.sh --dev`` installs), driven by Selenium through the system ``chromedriver``; Selenium Manager is
never asked to download a browser or a driver."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1600, arguments: tuple = ()):
    """A headless Chromium WebDriver (window ``width`` x ``height`` CSS pixels, with Chromium's command-line
    ``arguments`` added), quit on exit.

    Skips the test when the browser or its driver is missing, except under ``CI=true``, where the
    README's set-up must have installed them, so there it fails."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        message = "Chromium or chromedriver missing: run `bash setup.sh --dev` (installs Debian's chromium packages)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                     # Nothing but the page under test: no update, sync, metrics or safe-browsing traffic.
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-default-apps", "--disable-domain-reliability", "--no-default-browser-check",
                     "--disable-client-side-phishing-detection", "--metrics-recording-only", "--no-pings"):
        options.add_argument(argument)
    for argument in arguments:
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def screenshot(browser, path: Path) -> Path:
    """Saves a PNG of the browser's viewport to ``path`` and checks that it is a non-empty PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(path)), f"no screenshot written to {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def docs_screenshot(browser, name: str) -> None:
    """With ``PHILO_DOCS_SCREENSHOTS=1``, saves the browser's viewport to ``docs/<name>``: the README's
    screenshots are taken by the tests' own code (``PHILO_DOCS_SCREENSHOTS=1 pytest tests/test_report_page.py
    tests/test_chat_page.py``)."""
    import os

    if os.environ.get("PHILO_DOCS_SCREENSHOTS") == "1":
        screenshot(browser, Path(__file__).resolve().parent.parent / "docs" / name)


def external_requests(browser, allowed_prefixes: tuple = ("file:", "data:", "blob:", "http://127.0.0.1", "ws://127.0.0.1")) -> list:
    """URLs of the resources the page loaded that are not local: a page of ours must load none (it works
    offline, and nothing here may reach outside the machine)."""
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [url for url in urls if not url.startswith(allowed_prefixes)]
