"""The app in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Clicks Generate and waits for the three images; the screenshot it takes is kept as a test artifact
(``$DORA_APP_SCREENSHOT``, else a temporary file; the path is printed).
"""

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return sync_playwright


def test_generate_shows_three_images(served, tmp_path):  # noqa: F811
    sync_playwright = browser_or_skip()
    app, engine = served
    shot = Path(os.environ.get("DORA_APP_SCREENSHOT") or tmp_path / "app-compare.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.local_url)
            page.wait_for_selector("#generate", timeout=30_000)
            page.locator("#generate").click()
            for key in ("base", "lora", "dora"):
                page.wait_for_selector(f"#compare-{key} img", timeout=60_000)
            page.wait_for_function("document.querySelector('#status').innerText.includes('Seed')", timeout=30_000)
            assert "same initial noise" in page.locator("#status").inner_text()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 0 and engine.pipe_loads == 1
