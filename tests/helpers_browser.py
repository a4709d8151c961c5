"""A real headless browser for the page tests (tests/test_serve.py, tests/test_report_page.py):
Debian's Chromium driven through selenium, everything that would call out switched off."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _chromium():
    """selenium's webdriver and Service; skips outside CI when Debian's chromium is not installed."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        why = f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(why + " (.ci/run installs them)")
        pytest.skip(why + " (CI installs them; this test runs there)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    return webdriver, Service


def open_browser(profile: Path, width: int = 1100, height: int = 1300):
    """Headless Chromium with a fresh profile; its console is kept (`driver.get_log("browser")`)."""
    webdriver, Service = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def console_errors(driver) -> list[str]:
    """The browser console's errors since the last call (warnings and info left out)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
